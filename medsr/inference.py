"""Inference with a trained generator: exact tiled upscaling, the consistency score, registry models.

Everything here works on contract images (:mod:`medsr.data`: float32 ``(1, H, W)`` in
``[0, 1]``) and knows nothing of HTTP: reading uploads, mapping errors to statuses and packaging
Bentos live in ``serving/``. The service, the benchmark and scripts call these functions, so a
result is computed the same way wherever it is asked for.

Tiled inference
    A large image is cut into tiles whose *cores* partition it; each tile is its core plus a
    margin of the model's receptive radius (:func:`receptive_radius`) on every side, so every
    core pixel saw exactly the context it would have seen in a whole-image forward pass. Only the
    cores are kept, so tiled output equals whole-image output up to float rounding for every
    architecture, and memory is bounded by the tile size, not the image size.

Consistency score
    An SR result must agree with its own input: degrading the output with the training
    operator (:func:`medsr.degradations.degrade_standard` without its noise: Gaussian blur of
    ``degrade.blur_sigma``, then antialiased bicubic down) should give the input back. Its PSNR
    against the input is reported with every result; a low score is a hallucination warning sign.

Model sources
    The generators come from the MLflow registry: the registered model of each scale is named in
    ``params.yaml`` (``registry.model_names``), the alias served in ``serving.alias``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsr.data import check_contract
from medsr.degradations import degrade_bicubic
from medsr.metrics import psnr

logger = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class ModelNotFoundError(LookupError):
    """No generator is registered for a scale, or the requested version does not exist."""


# --------------------------------------------------------------------------------------------
# Phase timing (Server-Timing, /metrics)
# --------------------------------------------------------------------------------------------


class PhaseTimer:
    """Seconds spent per named phase of one request, in the order the phases first ran.

    One timer belongs to one request; phases may repeat (every tile's forward adds to
    ``forward``) and may overlap (the consistency score runs beside the encoder), so the sum of
    the phases can exceed the wall-clock :meth:`elapsed`.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:  # phases may run on two threads at once (the score beside the encoder)
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        """Sum of the phases (more than :meth:`elapsed` where phases overlapped)."""
        return sum(self.seconds.values())

    def elapsed(self) -> float:
        """Wall-clock seconds since the timer was made."""
        return time.perf_counter() - self.started


@contextlib.contextmanager
def timed_phase(timer: PhaseTimer | None, name: str) -> Iterator[None]:
    """``timer.phase(name)`` when there is a timer, else nothing (callers without Server-Timing)."""
    if timer is None:
        yield
    else:
        with timer.phase(name):
            yield


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU; ``cpu``/``cuda`` force one.

    Raises:
        ValueError: an unknown name, or ``cuda`` on a machine without a usable GPU.
    """
    name = (requested or "auto").strip().lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {requested!r}; use one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but torch sees no CUDA GPU; use device auto or cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# Receptive field
# --------------------------------------------------------------------------------------------

BICUBIC_RADIUS = 2
"""LR pixels the bicubic kernel reaches on each side: every generator adds a bicubic skip, which
hooks on modules cannot see (``F.interpolate``), and the residual CNN runs its convs on it."""

_GLOBAL_MODULES = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.Linear)
# Weak keys: an id() could be reused by the next model once this one is freed.
_RADIUS_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_RADIUS_LOCK = threading.Lock()


class UnboundedReceptiveField(ValueError):
    """The model pools or mixes globally: no finite margin makes tiles exact."""


def receptive_radius(model: torch.nn.Module, probe: int = 12) -> int:
    """Upper bound of the model's receptive radius, in LR pixels.

    Measured by running the model once on a ``probe`` x ``probe`` input with hooks on every
    module that mixes neighbouring pixels: each convolution or pooling adds its reach
    (``dilation * (kernel - 1) // 2``) at the resolution it runs at, converted to LR pixels, plus
    the bicubic skip's :data:`BICUBIC_RADIUS`. Summing every executed layer is exact for a chain
    and an upper bound where branches run in parallel (attention heads), which keeps tiles exact.
    A model may declare ``receptive_radius`` itself (an int attribute) to override this.

    Raises:
        UnboundedReceptiveField: the model has a global pooling or dense layer.
    """
    declared = getattr(model, "receptive_radius", None)
    if isinstance(declared, int):
        return declared
    with _RADIUS_LOCK:
        if model in _RADIUS_CACHE:
            return _RADIUS_CACHE[model]
        reach = 0.0
        unbounded: list[str] = []

        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            nonlocal reach
            if isinstance(module, _GLOBAL_MODULES):
                unbounded.append(type(module).__name__)
                return
            kernel = getattr(module, "kernel_size", None)
            if kernel is None or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
                return
            kernels = kernel if isinstance(kernel, tuple) else (kernel, kernel)
            dilation = getattr(module, "dilation", 1)
            dilations = dilation if isinstance(dilation, tuple) else (dilation, dilation)
            resolution = inputs[0].shape[-1] / probe  # 1 in LR space, `scale` after the pixel shuffle
            reach += max(d * (k - 1) // 2 for k, d in zip(kernels, dilations, strict=True)) / resolution

        handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
        try:
            parameter = next(model.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            with torch.inference_mode():
                model(torch.full((1, 1, probe, probe), 0.5, device=device))
        finally:
            for handle in handles:
                handle.remove()
        if unbounded:
            raise UnboundedReceptiveField(f"{type(model).__name__} has global layers ({', '.join(unbounded)})")
        radius = BICUBIC_RADIUS + math.ceil(reach - 1e-9)
        _RADIUS_CACHE[model] = radius
        return radius


# --------------------------------------------------------------------------------------------
# Tiled inference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """How a large image is cut for inference (sizes in LR pixels).

    ``tile`` is the side of the part of each tile that is kept (its core); every tile also
    carries the model's receptive radius on each side, so a forward pass sees ``tile + 2 *
    radius`` pixels. ``margin`` overrides the computed radius (tests use it to show seams).
    """

    tile: int = 256
    batch_size: int = 4
    margin: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 8 or self.batch_size < 1 or (self.margin is not None and self.margin < 0):
            raise ValueError(
                f"invalid tiling tile={self.tile}, batch_size={self.batch_size}, margin={self.margin}: "
                "need tile >= 8, batch_size >= 1, margin >= 0 (serving.tile, serving.tile_batch)"
            )

    @classmethod
    def from_params(cls, serving: Mapping[str, Any]) -> Tiling:
        return cls(tile=int(serving["tile"]), batch_size=int(serving["tile_batch"]))


def tile_windows(length: int, core: int, margin: int) -> list[tuple[int, int, int]]:
    """``(window_start, core_start, core_end)`` per tile along one axis.

    The cores partition ``[0, length)``; every window has the same size ``min(length, core + 2 *
    margin)`` (so tiles batch together) and holds its core at least ``margin`` pixels from each
    of its edges that is not an edge of the image.
    """
    size = min(length, core + 2 * margin)
    if size >= length:
        return [(0, 0, length)]
    windows = []
    for start in range(0, length, core):
        end = min(start + core, length)
        windows.append((min(max(start - margin, 0), length - size), start, end))
    return windows


MEMORY_FORMATS: dict[str, torch.memory_format] = {"contiguous": torch.contiguous_format,
                                                  "channels_last": torch.channels_last}


def median_forward_seconds(model: torch.nn.Module, sample: torch.Tensor, repeats: int) -> float:
    """The median wall time of ``model(sample)`` over ``repeats`` calls, after one warm-up call."""
    with torch.inference_mode():
        model(sample)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(sample)
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def choose_memory_format(model: torch.nn.Module, *, probe: int = 96, repeats: int = 3,
                         device: torch.device | str = "cpu") -> str:
    """Leave ``model`` in the faster of its two weight layouts here, and return that layout's name.

    Measured, not assumed: on this machine's CPU (torch 2.13, oneDNN) ESPCN runs a 256x256 input
    in 166 ms channels_last against 246 ms contiguous (ONNX Runtime 183 ms, a frozen TorchScript
    trace 224 ms); deeper nets may differ. Both layouts compute the same convolutions (outputs
    agree to float rounding; tests/test_inference.py checks every architecture). A one-channel
    input is laid out the same way in both formats, so callers need not convert their tensors.
    """
    sample = torch.rand(1, 1, probe, probe, device=device)
    contiguous = median_forward_seconds(model, sample, repeats)
    model.to(memory_format=torch.channels_last)
    if median_forward_seconds(model, sample, repeats) < 0.95 * contiguous:
        return "channels_last"
    model.to(memory_format=torch.contiguous_format)
    return "contiguous"


def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Run the generator on an ``(N, 1, h, w)`` batch; returns ``(N, 1, h*s, w*s)`` float32 in [0, 1]."""
    device = torch.device(device)
    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        output = model(tensor)
        # Eval-mode generators clamp already; the clamp guards a model that does not.
        output = output.float().clamp_(0.0, 1.0)
    return output.cpu().numpy()


def upscale_image(model: torch.nn.Module, image: np.ndarray, scale: int, *, tiling: Tiling = Tiling(),
                  device: torch.device | str = "cpu", timer: PhaseTimer | None = None) -> np.ndarray:
    """Super-resolve one contract image by ``scale``, in tiles when it is large.

    Returns a contract image of shape ``(1, H*scale, W*scale)``, equal to the whole-image forward
    pass up to float rounding (see the module docstring). ``timer`` gets ``window`` (cutting and
    stitching tiles) and ``forward`` phases.

    Raises:
        UnboundedReceptiveField: the model cannot be tiled and the image exceeds one tile.
    """
    check_contract(image, "input image")
    _, height, width = image.shape
    if height < 1 or width < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    margin = tiling.margin if tiling.margin is not None else receptive_radius(model)
    rows, cols = tile_windows(height, tiling.tile, margin), tile_windows(width, tiling.tile, margin)
    if len(rows) == 1 and len(cols) == 1:
        with timed_phase(timer, "forward"):
            return forward(model, image[None], device)[0]
    tile_h, tile_w = min(height, tiling.tile + 2 * margin), min(width, tiling.tile + 2 * margin)
    output = np.empty((1, height * scale, width * scale), dtype=np.float32)
    pending: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []

    def flush() -> None:
        with timed_phase(timer, "window"):
            batch = np.stack([image[:, r[0]:r[0] + tile_h, c[0]:c[0] + tile_w] for r, c in pending])
        with timed_phase(timer, "forward"):
            results = forward(model, batch, device)
        with timed_phase(timer, "window"):
            for (row, col), result in zip(pending, results, strict=True):
                top, left = (row[1] - row[0]) * scale, (col[1] - col[0]) * scale
                rows_out, cols_out = (row[2] - row[1]) * scale, (col[2] - col[1]) * scale
                output[0, row[1] * scale:row[2] * scale, col[1] * scale:col[2] * scale] = \
                    result[0, top:top + rows_out, left:left + cols_out]
        pending.clear()

    for row in rows:
        for col in cols:
            pending.append((row, col))
            if len(pending) == tiling.batch_size:
                flush()
    if pending:
        flush()
    return output


# --------------------------------------------------------------------------------------------
# Consistency score
# --------------------------------------------------------------------------------------------

CONSISTENCY_BORDER = 1
"""LR pixels cropped on every side before the consistency PSNR (padding-dependent pixels)."""


def _gaussian_blur_fast(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """:func:`medsr.degradations.gaussian_blur` (scipy's ``gaussian_filter``, mode ``reflect``) as
    weighted sums of shifted views: the same taps and border, equal up to float32 rounding (< 1e-6).

    Written here because the degrade stage must keep scipy's bytes, while scipy takes ~18 ms on a
    1024^2 result where this takes ~7 (scipy filters in float64), once per served request.
    """
    if sigma <= 0:
        return image.copy()
    radius = int(truncate * float(sigma) + 0.5)  # scipy's kernel size rule
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / float(sigma)) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    height, width = image.shape[1:]
    # scipy's "reflect" repeats the edge sample (d c b a | a b c d): numpy's "symmetric".
    padded = np.pad(image[0], radius, mode="symmetric")
    rows = padded[:, :width] * kernel[0]
    for tap in range(1, kernel.size):
        rows += padded[:, tap:tap + width] * kernel[tap]
    out = rows[:height] * kernel[0]
    for tap in range(1, kernel.size):
        out += rows[tap:tap + height] * kernel[tap]
    return np.clip(out, 0.0, 1.0, out=out)[None]


def reproject(sr: np.ndarray, scale: int, blur_sigma: float) -> np.ndarray:
    """The training degradation without its noise: blur ``blur_sigma`` (HR px), bicubic down."""
    return degrade_bicubic(_gaussian_blur_fast(sr, blur_sigma), scale)


def consistency_psnr(sr: np.ndarray, lr: np.ndarray, scale: int, blur_sigma: float) -> float:
    """PSNR (dB) of the re-degraded SR output against the LR input it was made from.

    High (40 dB and more for a faithful model) when the output explains its input; low when
    the model added or removed structure that the input does not support.
    """
    if sr.shape[1:] != (lr.shape[1] * scale, lr.shape[2] * scale):
        raise ValueError(f"SR shape {sr.shape} is not {scale} x LR shape {lr.shape}")
    border = CONSISTENCY_BORDER if min(lr.shape[1:]) > 2 * CONSISTENCY_BORDER else 0
    return psnr(reproject(sr, scale, blur_sigma), lr, border=border)


# --------------------------------------------------------------------------------------------
# Registry models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedGenerator:
    """A generator ready for inference, and where it came from."""

    module: torch.nn.Module
    scale: int
    architecture: str  # medsr.models name, e.g. "espcn"
    registered_name: str  # "medsr-x4"
    version: str  # MLflow registry version
    source: str  # "mlflow" or "bentoml"
    spec: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"scale": self.scale, "architecture": self.architecture, "registered_name": self.registered_name,
                "version": self.version, "source": self.source}


def registry_version(name: str, version: str | None, alias: str) -> str:
    """The registry version number of registered model ``name``: ``version`` checked, else the alias's.

    Raises:
        ModelNotFoundError: nothing registered under that name, alias or version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medsr.tracking import configure

    configure()
    client = MlflowClient()
    try:
        if version is not None:
            return str(client.get_model_version(name, str(version)).version)
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelNotFoundError(f"{name} {wanted} not found in the MLflow registry") from err


def load_registered_generator(name: str, scale: int, version: str | None, alias: str,
                              device: torch.device | str = "cpu") -> LoadedGenerator:
    """Load ``models:/<name>/<version>`` (the alias's version when ``version`` is None)."""
    from medsr.tracking import load_logged_generator

    resolved = registry_version(name, version, alias)
    module, spec = load_logged_generator(f"models:/{name}/{resolved}", device=str(device))
    return checked_scale(LoadedGenerator(module=module, scale=int(spec["scale"]), architecture=str(spec["model"]),
                                         registered_name=name, version=resolved, source="mlflow", spec=spec), scale)


def checked_scale(loaded: LoadedGenerator, scale: int) -> LoadedGenerator:
    """``loaded``, after checking that it upscales by ``scale`` (what its registered name promises)."""
    if loaded.scale != scale or int(getattr(loaded.module, "scale", scale)) != scale:
        raise ModelNotFoundError(f"{loaded.registered_name} version {loaded.version} is a x{loaded.scale} "
                                 f"generator, registered as x{scale}; register it under the right name")
    return loaded


def output_pixels(height: int, width: int, scale: int, count: int = 1) -> int:
    """Pixels an upscaled result will have (all slices/frames together)."""
    return int(height) * int(width) * int(scale) ** 2 * int(count)


def describe_size(pixels: int) -> str:
    """``"57.6 MP"``: a pixel count for messages."""
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} px"


def side_for(pixels: int) -> int:
    """Side of the square with ``pixels`` pixels (for "at most N x N" messages)."""
    return int(math.isqrt(max(int(pixels), 0)))
