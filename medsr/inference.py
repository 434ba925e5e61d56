"""Inference with a generator: the :class:`Upscaler` (network, exact tiling, consistency step, score).

Everything here works on contract images (:mod:`medsr.data`: float32 ``(1, H, W)`` in
``[0, 1]``) and knows nothing of HTTP or MLflow: reading uploads, mapping errors to statuses and
packaging Bentos live in ``serving/``, loading registered models in :mod:`medsr.tracking`. Trainer
validation, the benchmark, ``medsr evaluate``, the registry's re-evaluation and every served
endpoint build an :class:`Upscaler`, so a result is computed the same way wherever it is asked for.

Tiled inference
    A large image is cut into tiles whose *cores* partition it; each tile is its core plus a
    margin of the model's receptive radius (:func:`receptive_radius`) on every side, so every
    core pixel saw exactly the context it would have seen in a whole-image forward pass. Only the
    cores are kept, so tiled output equals whole-image output up to float rounding for every
    architecture, and memory is bounded by the tile size, not the image size.

Consistency step and score
    The network's output goes through the back-projection of :mod:`medsr.consistency` (when
    ``consistency.steps`` > 0), and the result is scored by degrading it again and comparing with
    the input (:func:`medsr.consistency.consistency_psnr`); a low score is a hallucination
    warning sign. :class:`Upscaled` carries the output, the network's raw output and the score.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from medsr.consistency import ConsistencySettings, consistency_psnr, refine
from medsr.data import check_contract

logger = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pick_device(requested: str = "auto") -> torch.device:
    """The one device resolver (training, evaluation, serving): ``auto`` is CUDA when a GPU is
    visible, else CPU; ``cpu``/``cuda``/``cuda:N`` force one.

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


def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device | str | None = None) -> np.ndarray:
    """Run the generator in eval mode on an ``(N, 1, h, w)`` batch; returns ``(N, 1, h*s, w*s)``
    float32 in [0, 1]. ``device``: where the model's parameters are when None. A model in
    training mode is put back in it afterwards (trainer validation calls this mid-training)."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    array = np.ascontiguousarray(batch, dtype=np.float32)
    if not array.flags.writeable:  # a read-only memory map: torch must not alias it
        array = array.copy()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(torch.from_numpy(array).to(device))
            # Eval-mode generators clamp already; the clamp guards a model that does not.
            output = output.float().clamp_(0.0, 1.0)
    finally:
        model.train(was_training)
    return output.cpu().numpy()


def predict_image(model: torch.nn.Module, lr: np.ndarray, device: torch.device | str | None = None) -> np.ndarray:
    """The network alone on one whole contract image ``(1, h, w)`` -> ``(1, h*s, w*s)``.

    Raises:
        ValueError: ``lr`` is not one ``(1, h, w)`` image.
    """
    if lr.ndim != 3 or lr.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, h, w), got {lr.shape}")
    return forward(model, lr[None], device)[0]


def upscale_image(model: torch.nn.Module, image: np.ndarray, scale: int, *, tiling: Tiling = Tiling(),
                  device: torch.device | str | None = None, timer: PhaseTimer | None = None) -> np.ndarray:
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
# The Upscaler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upscaled:
    """One upscaled image: ``output`` (what is served and scored), ``raw`` (the network alone; the
    same array as ``output`` when the consistency step is off) and ``consistency_psnr`` of ``output``."""

    output: np.ndarray
    raw: np.ndarray
    consistency_psnr: float


@dataclass
class Upscaler:
    """A generator with everything that turns its input into the served output.

    ``module``: the generator, on ``device`` (None: wherever its parameters are); ``scale``: its
    factor. ``tiling``: how large inputs are cut (:func:`upscale_image`); None runs every image
    whole, as training validation and the benchmark do. ``consistency``: the back-projection
    after the network (off by default). ``score_blur_sigma``: the blur (HR px) the consistency
    score assumes before downsampling.

    Every entry point calls :meth:`__call__` (or its parts, :meth:`network`, :meth:`network_batch`,
    :meth:`refine` and :meth:`score`, where it interleaves them with other work), so an image gets
    the same pixels and the same score wherever it is upscaled.
    """

    module: torch.nn.Module
    scale: int
    consistency: ConsistencySettings = field(default_factory=ConsistencySettings)
    tiling: Tiling | None = None
    device: torch.device | str | None = None
    score_blur_sigma: float = 0.0

    def network(self, lr: np.ndarray, timer: PhaseTimer | None = None) -> np.ndarray:
        """The network's output for one contract image (tiled when it exceeds a tile)."""
        check_contract(lr, "input image")
        if self.tiling is None:
            with timed_phase(timer, "forward"):
                return predict_image(self.module, lr, self.device)
        module, tiling = self.module, self.tiling
        for_image = getattr(module, "for_image", None)
        if for_image is not None:
            # A per-image choice (the noise gate, medsr.models.gated) is made on the whole image, not per tile.
            if tiling.margin is None:
                tiling = replace(tiling, margin=receptive_radius(module))
            module = for_image(lr)
        return upscale_image(module, lr, self.scale, tiling=tiling, device=self.device, timer=timer)

    def network_batch(self, images: list[np.ndarray], timer: PhaseTimer | None = None,
                      max_batch: int = 16) -> list[np.ndarray]:
        """:meth:`network` of each image; same-shape images that fit one tile share forward passes
        of up to ``max_batch`` (the same convolutions, so the same pixels up to float rounding)."""
        outputs: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            check_contract(image, f"input image {index}")
            groups.setdefault(image.shape, []).append(index)
        for shape, members in groups.items():
            if self.tiling is not None and max(shape[1:]) > self.tiling.tile:
                for i in members:
                    outputs[i] = self.network(images[i], timer)
                continue
            for start in range(0, len(members), max_batch):
                chunk = members[start:start + max_batch]
                with timed_phase(timer, "forward"):
                    batch = forward(self.module, np.stack([images[i] for i in chunk]), self.device)
                for i, result in zip(chunk, batch, strict=True):
                    outputs[i] = result
        return [output for output in outputs if output is not None]

    def refine(self, raw: np.ndarray, lr: np.ndarray, timer: PhaseTimer | None = None) -> np.ndarray:
        """The consistency step on the network's output; ``raw`` itself when the step is off."""
        if not self.consistency.enabled:
            return raw
        with timed_phase(timer, "refine"):
            return refine(raw, lr, self.scale, self.consistency)

    def score(self, output: np.ndarray, lr: np.ndarray, timer: PhaseTimer | None = None) -> float:
        """The consistency PSNR (dB) of ``output`` against the input ``lr``."""
        with timed_phase(timer, "consistency"):
            return consistency_psnr(output, lr, self.scale, self.score_blur_sigma)

    def __call__(self, lr: np.ndarray, timer: PhaseTimer | None = None, *, score: bool = True) -> Upscaled:
        """Network, consistency step and score of one contract image; ``score=False`` skips the
        score (NaN) where nobody reads it (the benchmark scores against HR instead)."""
        raw = self.network(lr, timer)
        output = self.refine(raw, lr, timer)
        return Upscaled(output=output, raw=raw, consistency_psnr=self.score(output, lr, timer) if score else math.nan)


def output_pixels(height: int, width: int, scale: int, count: int = 1) -> int:
    """Pixels an upscaled result will have (all slices/frames together)."""
    return int(height) * int(width) * int(scale) ** 2 * int(count)


def describe_size(pixels: int) -> str:
    """``"57.6 MP"``: a pixel count for messages."""
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} px"


def side_for(pixels: int) -> int:
    """Side of the square with ``pixels`` pixels (for "at most N x N" messages)."""
    return int(math.isqrt(max(int(pixels), 0)))
