"""Inference with a trained generator: tiled upscaling, the consistency score, model sources.

Everything here works on contract images (:mod:`medsr.data`: float32 ``(1, H, W)`` in
``[0, 1]``); reading and writing files in their own formats lives in
:mod:`medsr.data.loading` and :mod:`medsr.data.writing`. The BentoML service
(``serving/service.py``), the benchmark and scripts all call these functions, so a result is
computed the same way wherever it is asked for.

Tiled inference
    A large image is cut into ``tile`` x ``tile`` LR tiles that overlap their neighbours by
    ``overlap`` LR pixels; each tile goes through the network on its own (a few at a time), and
    the HR outputs are blended with weights that are zero in the outer quarter of every overlap
    (where the convolutions saw the tile's artificial border) and ramp linearly to one across
    the rest. Memory is bounded by the tile size, not the image size, apart from the HR output
    itself; for a network whose receptive field fits in a quarter of the overlap the result
    equals whole-image inference up to float rounding.

Consistency score
    An SR result must agree with its own input: degrading the output with the standard
    operator (the Gaussian blur of ``degrade.blur_sigma`` then antialiased bicubic
    downsampling, without the random noise) should give back the input. Its PSNR against the
    input is reported with every result; a low score is a hallucination warning sign.

Model sources
    The generators come from the MLflow registry (registered models ``medsr-x2``/``medsr-x4``,
    alias ``champion``, logged by :func:`medsr.tracking.log_generator`) or from BentoML models
    that :func:`import_champions_to_bentoml` copied from it (what a built Bento carries).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.data import check_contract
from medsr.degradations import degrade_bicubic, gaussian_blur
from medsr.metrics import psnr

logger = logging.getLogger(__name__)

REGISTERED_MODEL_NAMES: dict[int, str] = {4: "medsr-x4", 2: "medsr-x2"}
"""Registered model name per scale, in the MLflow registry and the BentoML model store."""
CHAMPION_ALIAS = "champion"
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class ModelNotFoundError(LookupError):
    """No generator is registered for a scale, or the requested version does not exist."""


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
# Tiled inference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """How a large image is cut for inference (sizes in LR pixels)."""

    tile: int = 256
    overlap: int = 32
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.tile < 8 or self.overlap < 0 or self.overlap * 2 > self.tile or self.batch_size < 1:
            raise ValueError(
                f"invalid tiling tile={self.tile}, overlap={self.overlap}, batch_size={self.batch_size}: "
                "need tile >= 8, 0 <= overlap <= tile / 2, batch_size >= 1 (serving.tile, serving.overlap)"
            )

    @classmethod
    def from_params(cls, serving: Mapping[str, Any]) -> Tiling:
        return cls(tile=int(serving.get("tile", cls.tile)), overlap=int(serving.get("overlap", cls.overlap)),
                   batch_size=int(serving.get("tile_batch", cls.batch_size)))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)``, neighbours sharing at
    least ``overlap`` pixels; the last tile ends exactly at ``length`` (it may overlap more)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _blend_weights(starts: Sequence[int], tile: int, overlap: int, scale: int) -> list[np.ndarray]:
    """One 1-D HR weight profile per tile along one axis (see the module docstring)."""
    size = tile * scale
    margin = (overlap // 4) * scale
    ramp_length = overlap * scale - 2 * margin
    centres = np.arange(size, dtype=np.float64) + 0.5
    if ramp_length > 0:
        rising = np.clip((centres - margin) / ramp_length, 0.0, 1.0)
    else:
        rising = np.ones(size)
    profiles = []
    for index in range(len(starts)):
        weight = np.ones(size)
        if index > 0:  # a neighbour before: fade in
            weight = np.minimum(weight, rising)
        if index < len(starts) - 1:  # a neighbour after: fade out
            weight = np.minimum(weight, rising[::-1])
        profiles.append(weight)
    return profiles


def forward(model: torch.nn.Module, batch: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Run the generator on an ``(N, 1, h, w)`` batch; returns ``(N, 1, h*s, w*s)`` float32 in [0, 1]."""
    device = torch.device(device)
    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        output = model(tensor)
    # Eval-mode generators clamp already; the clip guards a model that does not.
    return np.clip(output.float().cpu().numpy(), 0.0, 1.0)


def _tiles(image: np.ndarray, rows: Sequence[int], cols: Sequence[int], tile_h: int, tile_w: int
           ) -> Iterator[tuple[int, int, np.ndarray]]:
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            yield i, j, image[:, top:top + tile_h, left:left + tile_w]


def upscale_image(model: torch.nn.Module, image: np.ndarray, scale: int, *, tiling: Tiling = Tiling(),
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Super-resolve one contract image by ``scale``, in overlapping tiles when it is large.

    Returns a contract image of shape ``(1, H*scale, W*scale)``. Images no larger than one tile
    go through the network whole.
    """
    check_contract(image, "input image")
    _, height, width = image.shape
    if height < 1 or width < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    tile_h, tile_w = min(tiling.tile, height), min(tiling.tile, width)
    rows, cols = tile_starts(height, tile_h, tiling.overlap), tile_starts(width, tile_w, tiling.overlap)
    if len(rows) == 1 and len(cols) == 1:
        return forward(model, image[None], device)[0]

    weights_y = _blend_weights(rows, tile_h, tiling.overlap, scale)
    weights_x = _blend_weights(cols, tile_w, tiling.overlap, scale)
    # Tile weights are separable products on a full grid, so their sum is the outer product of
    # the per-axis sums: no full-size weight accumulator is needed.
    norm_y = np.zeros(height * scale)
    norm_x = np.zeros(width * scale)
    for top, profile in zip(rows, weights_y, strict=True):
        norm_y[top * scale:(top + tile_h) * scale] += profile
    for left, profile in zip(cols, weights_x, strict=True):
        norm_x[left * scale:(left + tile_w) * scale] += profile

    output = np.zeros((1, height * scale, width * scale), dtype=np.float32)
    pending: list[tuple[int, int, np.ndarray]] = []

    def flush() -> None:
        results = forward(model, np.stack([tile for _, _, tile in pending]), device)
        for (i, j, _), result in zip(pending, results, strict=True):
            top, left = rows[i] * scale, cols[j] * scale
            weight = np.outer(weights_y[i], weights_x[j]).astype(np.float32)
            output[0, top:top + tile_h * scale, left:left + tile_w * scale] += result[0] * weight
        pending.clear()

    for item in _tiles(image, rows, cols, tile_h, tile_w):
        pending.append(item)
        if len(pending) == tiling.batch_size:
            flush()
    if pending:
        flush()
    output /= np.outer(norm_y, norm_x).astype(np.float32)
    np.clip(output, 0.0, 1.0, out=output)
    return output


# --------------------------------------------------------------------------------------------
# Consistency score
# --------------------------------------------------------------------------------------------

CONSISTENCY_BORDER = 1
"""LR pixels cropped on every side before the consistency PSNR (padding-dependent pixels)."""


def reproject(sr: np.ndarray, scale: int, blur_sigma: float) -> np.ndarray:
    """The standard degradation without noise: blur ``blur_sigma`` (HR px), bicubic down."""
    return degrade_bicubic(gaussian_blur(sr, blur_sigma), scale)


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
# Model sources
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


def registry_version(scale: int, version: str | None = None, alias: str = CHAMPION_ALIAS) -> str:
    """The registry version number of ``medsr-x<scale>``: ``version`` checked, else the alias's.

    Raises:
        ModelNotFoundError: nothing registered under that name, alias or version.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medsr.tracking import configure

    if scale not in REGISTERED_MODEL_NAMES:
        raise ModelNotFoundError(f"no registered model name for scale {scale}; known scales: "
                                 f"{', '.join(map(str, sorted(REGISTERED_MODEL_NAMES)))}")
    name = REGISTERED_MODEL_NAMES[scale]
    configure()
    client = MlflowClient()
    try:
        if version is not None:
            return str(client.get_model_version(name, str(version)).version)
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelNotFoundError(f"{name} {wanted} not found in the MLflow registry") from err


def load_registered_generator(scale: int, version: str | None = None, device: torch.device | str = "cpu",
                              alias: str = CHAMPION_ALIAS) -> LoadedGenerator:
    """Load ``models:/medsr-x<scale>/<version>`` (the alias's version when ``version`` is None)."""
    from medsr.tracking import load_logged_generator

    resolved = registry_version(scale, version, alias)
    name = REGISTERED_MODEL_NAMES[scale]
    module, spec = load_logged_generator(f"models:/{name}/{resolved}", device=str(device))
    return _checked(LoadedGenerator(module=module, scale=int(spec["scale"]), architecture=str(spec["model"]),
                                    registered_name=name, version=resolved, source="mlflow", spec=spec), scale)


def _checked(loaded: LoadedGenerator, scale: int) -> LoadedGenerator:
    if loaded.scale != scale or int(getattr(loaded.module, "scale", scale)) != scale:
        raise ModelNotFoundError(f"{loaded.registered_name} version {loaded.version} is a x{loaded.scale} "
                                 f"generator, registered as x{scale}; register it under the right name")
    return loaded


BENTO_WEIGHTS_FILE = "generator_state.pt"
BENTO_SPEC_FILE = "generator_spec.json"


def import_champions_to_bentoml(scales: Sequence[int] = (4, 2), alias: str = CHAMPION_ALIAS) -> dict[int, str]:
    """Copy each scale's registry champion into the BentoML model store; returns scale -> tag.

    The BentoML model holds the bare ``state_dict`` and the architecture spec (no pickle), with
    the registry name and version in its labels. A scale without a champion is skipped, but the
    first scale (x4) is required.

    Raises:
        ModelNotFoundError: the first scale has no champion.
    """
    import bentoml
    import mlflow

    from medsr.tracking import SPEC_FILE, WEIGHTS_FILE, configure

    tags: dict[int, str] = {}
    for position, scale in enumerate(scales):
        try:
            version = registry_version(scale, None, alias)
        except ModelNotFoundError:
            if position == 0:
                raise
            logger.info("no %s champion registered: the Bento serves without x%d", REGISTERED_MODEL_NAMES[scale], scale)
            continue
        name = REGISTERED_MODEL_NAMES[scale]
        configure()
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
        weights, spec_file = next(local.rglob(WEIGHTS_FILE), None), next(local.rglob(SPEC_FILE), None)
        if weights is None or spec_file is None:
            raise ModelNotFoundError(f"models:/{name}/{version} has no {WEIGHTS_FILE}/{SPEC_FILE}; "
                                     "log it with medsr.tracking.log_generator")
        spec = json.loads(spec_file.read_text())
        with bentoml.models.create(
            name, labels={"registry_version": version, "architecture": str(spec["model"]), "scale": str(scale)},
            metadata={"registry_name": name, "registry_version": version, "spec": spec},
        ) as model:
            Path(model.path, BENTO_WEIGHTS_FILE).write_bytes(weights.read_bytes())
            Path(model.path, BENTO_SPEC_FILE).write_text(json.dumps(spec, sort_keys=True))
        tags[scale] = str(model.tag)
    return tags


def load_bentoml_generator(model_path: str | Path, metadata: Mapping[str, Any], scale: int,
                           device: torch.device | str = "cpu") -> LoadedGenerator:
    """Rebuild a generator from a BentoML model folder written by :func:`import_champions_to_bentoml`."""
    from medsr.models import build_generator

    spec = json.loads(Path(model_path, BENTO_SPEC_FILE).read_text())
    state = torch.load(Path(model_path, BENTO_WEIGHTS_FILE), map_location=str(device), weights_only=True)
    module = build_generator(spec["model"], int(spec["scale"]), **spec.get("options", {}))
    module.load_state_dict(state)
    module = module.to(device).eval()
    return _checked(LoadedGenerator(module=module, scale=int(spec["scale"]), architecture=str(spec["model"]),
                                    registered_name=str(metadata.get("registry_name", REGISTERED_MODEL_NAMES[scale])),
                                    version=str(metadata.get("registry_version", "unknown")), source="bentoml",
                                    spec=spec), scale)


def output_pixels(height: int, width: int, scale: int, count: int = 1) -> int:
    """Pixels an upscaled result will have (all slices/frames together)."""
    return int(height) * int(width) * int(scale) ** 2 * int(count)


def describe_size(pixels: int) -> str:
    """``"57.6 MP"``: a pixel count for messages."""
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} px"


def side_for(pixels: int) -> int:
    """Side of the square with ``pixels`` pixels (for "at most N x N" messages)."""
    return int(math.isqrt(max(int(pixels), 0)))


# --------------------------------------------------------------------------------------------
# Files: read an upload, upscale every frame, write the same format back
# --------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A request's image cannot be processed; ``kind`` classifies it for the HTTP status.

    Kinds: ``malformed`` (corrupt, truncated, empty: 400), ``unsupported_media`` (not an image
    format we read: 415), ``too_large`` (413), ``unprocessable`` (valid file, but not something
    we can upscale: NaN pixels, several frames where one was expected, a scale without a model:
    422). ``str()`` never contains a file name or path (they can hold patient names).
    """

    STATUS: dict[str, int] = {"malformed": 400, "unsupported_media": 415, "too_large": 413, "unprocessable": 422}

    def __init__(self, kind: str, error: str, fix: str) -> None:
        if kind not in self.STATUS:
            raise ValueError(f"unknown InputError kind {kind!r}")
        self.kind = kind
        self.error = error
        self.fix = fix
        super().__init__(f"{error}. Fix: {fix}")

    @property
    def status(self) -> int:
        return self.STATUS[self.kind]


FILE_FORMATS: tuple[str, ...] = ("dicom", "nifti", "png", "tiff", "jpeg")
_UPLOAD_NAMES = {"dicom": "upload.dcm", "nifti": "upload.nii", "nifti-gz": "upload.nii.gz",
                 "png": "upload.png", "tiff": "upload.tif", "jpeg": "upload.jpg"}
_DICOM_MODALITIES = {"CT": "ct", "MR": "mri", "PT": "ct"}  # anything else (CR, DX, MG, ...) is X-ray-like
SUPPORTED_UPLOADS = "DICOM (.dcm), NIfTI (.nii, .nii.gz), PNG, TIFF or JPEG"


def sniff_format(head: bytes, name_hint: str = "") -> str | None:
    """The format of a file from its first bytes (``dicom``, ``nifti``, ``nifti-gz``, ``png``,
    ``tiff``, ``jpeg``), else from ``name_hint``'s extension for DICOM without preamble; None
    when it is none of them."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        return "nifti-gz"
    if len(head) >= 348:
        for order in ("little", "big"):
            size = int.from_bytes(head[:4], order)  # type: ignore[arg-type]
            if (size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00")) or (size == 540 and head[4:8] == b"n+2\x00"):
                return "nifti"
    if name_hint.lower().endswith((".dcm", ".dicom")):
        return "dicom"
    return None


def _modality_of(images: Sequence[Any], file_format: str, requested: str | None) -> str:
    from medsr.data import MODALITIES

    if requested:
        if requested not in MODALITIES:
            raise InputError("unprocessable", f"unknown modality {requested!r}",
                             f"pass modality as one of {', '.join(MODALITIES)}, or leave it out to infer it")
        return requested
    if file_format == "dicom":
        return _DICOM_MODALITIES.get(str(images[0].extra.get("dicom_modality", "")).upper(), "xray")
    return "mri" if file_format == "nifti" else "xray"


_LOAD_KINDS = {
    "empty file": "malformed", "truncated or corrupt DICOM": "malformed", "unreadable image": "malformed",
    "unreadable NIfTI": "malformed", "undecodable pixel data": "malformed",
    "not a DICOM file": "unsupported_media", "unsupported file type": "unsupported_media",
    "image too large": "too_large",
}


def _input_error_from_load(err: Exception, upload: Path, max_output_pixels: int, scale: int) -> InputError:
    """A LoadError as an InputError whose message holds no path (the upload's name is the user's)."""
    reason = getattr(err, "reason", "unreadable image")
    detail = getattr(err, "detail", "") or ""
    for text in {str(upload), upload.name, str(upload.parent)}:
        detail = detail.replace(text, "<upload>")
    kind = _LOAD_KINDS.get(reason, "unprocessable")
    if kind == "too_large":
        side = side_for(max_output_pixels)
        return InputError("too_large", f"image too large: at x{scale} the output would exceed "
                          f"serving.max_output_pixels = {max_output_pixels} ({describe_size(max_output_pixels)}, "
                          f"about {side}x{side}) ({detail})",
                          "crop or downsample the image, use a smaller scale, or raise serving.max_output_pixels")
    message = f"{reason} ({detail})" if detail else reason
    fix = getattr(err, "fix", "") or f"upload a valid {SUPPORTED_UPLOADS} file"
    if reason == "non-finite pixel values":
        fix = "replace NaN/inf pixels (e.g. with 0) before uploading"
    return InputError(kind, message, fix)


def read_upload(path: Path, *, scale: int, max_output_pixels: int, modality: str | None = None,
                name_hint: str = "", keep_all_slices: bool = True) -> tuple[str, list[Any], str]:
    """Load an uploaded file as contract images: ``(file_format, images, modality)``.

    The format comes from the content (magic numbers), not the name. NIfTI volumes give every
    slice; multi-frame DICOM/TIFF give every frame (the caller picks one). The loader refuses
    a file whose output at ``scale`` would exceed ``max_output_pixels`` before decoding it.

    Raises:
        InputError: for anything wrong with the file.
    """
    import os
    import tempfile

    from medsr.data.loading import LoadError, load_dicom, load_nifti, load_raster

    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        raise InputError("malformed", "empty file: the uploaded file has 0 bytes",
                         f"attach the image as the `file` field ({SUPPORTED_UPLOADS})")
    with path.open("rb") as handle:
        head = handle.read(1024)
    kind = sniff_format(head, name_hint or path.name)
    if kind is None:
        raise InputError("unsupported_media", "unsupported file type: the upload is not "
                         f"{SUPPORTED_UPLOADS} (its first bytes match none of them)",
                         f"upload a {SUPPORTED_UPLOADS} file")
    max_pixels = max(1, max_output_pixels // (scale * scale))
    loader = {"dicom": load_dicom, "nifti": load_nifti, "nifti-gz": load_nifti}.get(kind, load_raster)
    with tempfile.TemporaryDirectory(prefix="medsr-upload-") as tmp:
        # A neutral name: the loaders pick NIfTI by extension, and MedImage.source keeps no user file name.
        link = Path(tmp) / _UPLOAD_NAMES[kind]
        os.symlink(path.resolve(), link)
        try:
            images = loader(link, modality or "xray", root=Path(tmp), max_pixels=max_pixels, slice_step=1,
                            min_foreground_fraction=0.0)
        except LoadError as err:
            raise _input_error_from_load(err, link, max_output_pixels, scale) from None
    if not images:
        raise InputError("unprocessable", "no image in the file", f"upload a file holding a 2-D image ({SUPPORTED_UPLOADS})")
    file_format = "nifti" if kind.startswith("nifti") else kind
    chosen_modality = _modality_of(images, file_format, modality)
    for image in images:
        image.modality = chosen_modality
    return file_format, images, chosen_modality


def select_frame(images: list[Any], file_format: str, frame: int | None) -> list[Any]:
    """The frames to upscale: all slices of a NIfTI volume; one frame of a DICOM/TIFF.

    Raises:
        InputError: several frames and no ``frame``, a ``frame`` out of range, or a ``frame``
            for a NIfTI volume.
    """
    if file_format == "nifti":
        if frame is not None:
            raise InputError("unprocessable", "frame does not apply to NIfTI volumes (every slice is upscaled)",
                             "leave `frame` out for NIfTI uploads")
        return images
    count = len(images)
    if frame is None:
        if count > 1:
            raise InputError("unprocessable", f"multi-frame file: it holds {count} frames where a single frame was "
                             "expected", f"pass `frame` (0..{count - 1}) to upscale one frame, or upload one frame per file")
        return images
    if not 0 <= frame < count:
        raise InputError("unprocessable", f"frame {frame} out of range: the file holds {count} frame(s)",
                         f"pass `frame` between 0 and {count - 1}")
    return [images[frame]]


@dataclass
class FileResult:
    """An upscaled file in its source's format, with what the response reports about it."""

    content: bytes
    media_type: str
    filename: str
    file_format: str
    modality: str
    frames: int
    input_size: tuple[int, int]  # (H, W) of one frame
    output_size: tuple[int, int]
    consistency_psnr: float  # mean over frames/slices
    consistency_min_psnr: float
    seconds: float


def upscale_file(path: Path, generator: LoadedGenerator, *, max_output_pixels: int, tiling: Tiling,
                 device: torch.device | str, blur_sigma: float, modality: str | None = None,
                 frame: int | None = None, name_hint: str = "") -> FileResult:
    """Read an upload, super-resolve it with ``generator``, and write it back in its own format.

    Raises:
        InputError: for anything wrong with the upload (see :class:`InputError`).
    """
    import time

    from medsr.data import writing

    started = time.perf_counter()
    scale = generator.scale
    file_format, images, chosen_modality = read_upload(path, scale=scale, max_output_pixels=max_output_pixels,
                                                       modality=modality, name_hint=name_hint)
    chosen = select_frame(images, file_format, frame)
    total = sum(output_pixels(*image.pixels.shape[1:], scale) for image in chosen)
    if total > max_output_pixels:
        raise InputError("too_large", f"image too large: the output would have {total} pixels "
                         f"({describe_size(total)}), over serving.max_output_pixels = {max_output_pixels}",
                         "crop or downsample the image, use a smaller scale, or raise serving.max_output_pixels")
    results, scores = [], []
    for image in chosen:
        result = upscale_image(generator.module, image.pixels, scale, tiling=tiling, device=device)
        results.append(result)
        scores.append(consistency_psnr(result, image.pixels, scale, blur_sigma))
    mean_score = float(np.mean(scores))
    derivation = (f"Super-resolution x{scale} by MedSR: generator {generator.architecture}, registered model "
                  f"{generator.registered_name} version {generator.version}; consistency PSNR {mean_score:.1f} dB")
    try:
        if file_format == "dicom":
            content = writing.write_dicom(path, chosen, results, scale=scale, derivation=derivation)
            media_type, extension = writing.DICOM_MEDIA_TYPE, ".dcm"
        elif file_format == "nifti":
            content = writing.write_nifti(path, chosen, results, scale=scale)
            media_type = writing.NIFTI_MEDIA_TYPE
            extension = ".nii.gz" if writing.is_gzip(path) else ".nii"
        else:
            content = writing.write_raster(chosen, results, file_format, source=path, scale=scale)
            media_type, extension = writing.RASTER_MEDIA_TYPES[file_format], writing.RASTER_EXTENSIONS[file_format]
    except writing.WriteError as err:
        raise InputError("unprocessable", err.reason, err.fix) from None
    height, width = chosen[0].pixels.shape[1:]
    return FileResult(content=content, media_type=media_type, filename=f"medsr_x{scale}{extension}",
                      file_format=file_format, modality=chosen_modality, frames=len(chosen),
                      input_size=(height, width), output_size=(height * scale, width * scale),
                      consistency_psnr=mean_score, consistency_min_psnr=float(np.min(scores)),
                      seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Side-by-side comparison (the web page)
# --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """LR input, bicubic and model outputs (and the original when known), with their scores."""

    lr: np.ndarray
    bicubic: np.ndarray
    sr: np.ndarray
    hr: np.ndarray | None
    scores: dict[str, dict[str, float]]  # {"bicubic": {"psnr", "ssim"}, "model": {...}} when hr is known
    consistency_psnr: float
    cropped: bool


def center_crop(image: np.ndarray, max_side: int, multiple: int = 1) -> tuple[np.ndarray, bool]:
    """The central ``max_side`` square (at most), with sides cut to a multiple of ``multiple``."""
    _, height, width = image.shape
    new_h = min(height, max_side) // multiple * multiple
    new_w = min(width, max_side) // multiple * multiple
    if new_h < 1 or new_w < 1:
        raise InputError("unprocessable", f"image of {height}x{width} pixels is smaller than the scale {multiple}",
                         "upload a larger image or use a smaller scale")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    cropped = np.ascontiguousarray(image[:, top:top + new_h, left:left + new_w])
    return cropped, (new_h, new_w) != (height, width)


def compare(image: np.ndarray, generator: LoadedGenerator, *, noise_kind: str, noise_level: float,
            blur_sigma: float, consistency_blur_sigma: float, known_original: bool, max_side: int,
            tiling: Tiling, device: torch.device | str, seed: int = 0) -> Comparison:
    """What the web page shows: degrade the input as the sliders say, upscale it two ways, score.

    ``known_original``: the image is treated as the high-resolution original and the model's
    input is made from it (blur, bicubic down by the scale, noise), so PSNR/SSIM against it are
    known. Otherwise the image itself (with the sliders' blur and noise) is the model's input.
    """
    from medsr.degradations import add_modality_noise, degrade_standard, rng_for, upsample_bicubic
    from medsr.metrics import ssim

    scale = generator.scale
    rng = rng_for(seed, "serving-demo")
    if known_original:
        hr, cropped = center_crop(image, max_side, scale)
        lr = degrade_standard(hr, scale, blur_sigma=blur_sigma, noise_kind=noise_kind, noise_level=noise_level, rng=rng)
    else:
        source, cropped = center_crop(image, max(1, max_side // scale))
        hr = None
        lr = add_modality_noise(gaussian_blur(source, blur_sigma), noise_kind, noise_level, rng)
    bicubic = upsample_bicubic(lr, scale)
    sr = upscale_image(generator.module, lr, scale, tiling=tiling, device=device)
    scores: dict[str, dict[str, float]] = {}
    if hr is not None:
        for name, candidate in (("bicubic", bicubic), ("model", sr)):
            scores[name] = {"psnr": psnr(candidate, hr, border=scale)}
            try:
                scores[name]["ssim"] = ssim(candidate, hr, border=scale)
            except ValueError:  # too small for the SSIM window
                pass
    return Comparison(lr=lr, bicubic=bicubic, sr=sr, hr=hr, scores=scores,
                      consistency_psnr=consistency_psnr(sr, lr, scale, consistency_blur_sigma), cropped=cropped)


# --------------------------------------------------------------------------------------------
# Packaging (`medsr package`)
# --------------------------------------------------------------------------------------------


def package_bento(build_ctx: Path = Path("."), bentofile: str = "bentofile.yaml",
                  scales: Sequence[int] = (4, 2), alias: str = CHAMPION_ALIAS) -> tuple[str, dict[int, str]]:
    """Build a Bento of the service carrying the registry's champions; returns (bento tag, model tags).

    The champions are imported into the BentoML model store first; the Bento records
    ``model_source=bentoml`` and their tags as bento arguments, so it serves exactly those
    weights without the MLflow store.

    Raises:
        ModelNotFoundError: no x4 champion is registered.
    """
    import bentoml

    tags = import_champions_to_bentoml(scales, alias)
    arguments = {"model_source": "bentoml", "bento_models": json.dumps({str(scale): tag for scale, tag in tags.items()})}
    bento = bentoml.bentos.build_bentofile(str(Path(build_ctx) / bentofile), build_ctx=str(build_ctx), args=arguments)
    return str(bento.tag), tags
