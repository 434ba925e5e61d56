"""Load DICOM, NIfTI and raster files into contract images (see :mod:`medsr.data`).

This is the one place where the intensity window is applied. Every loader returns a list of
:class:`~medsr.data.MedImage` (one per frame or slice kept) whose ``window`` maps the ``[0, 1]``
pixels back to the original units with :meth:`Window.to_units`: the mapping is exactly linear
between ``window.low`` and ``window.high`` and clips outside, so ``to_units`` reproduces the
original values (HU for CT) wherever they lie inside the window, up to float32 rounding.

Windows
    * DICOM: modality LUT (rescale slope/intercept, or Modality LUT Sequence) first, then the
      VOI: a VOI LUT Sequence (``"voi_lut"``) or Window Center/Width (``"dicom_window"``) when
      the file has one, else the 0.5..99.5 percentiles of the modality-LUT values over all
      frames (``"percentile"``). MONOCHROME1 is inverted (``Window.inverted``) so that 1.0 is
      white/dense as in MONOCHROME2. Colour images become luma, window = stored range.
    * NIfTI: one window for the whole volume, the 0.5..99.5 percentiles of its non-zero voxels
      (``"percentile"``), so the slices of one volume are comparable.
    * PNG/JPEG/TIFF: the range of the stored dtype (``"dtype_range"``), e.g. 0..255, 0..65535.
    * A constant image is not an error here (validation quarantines it): its pixels are all 0.0
      and its window is ``Window(low=v, high=v)``.

Every image carries ``extra["raw_min"]`` and ``extra["raw_max"]``: the extremes of its values in
original units before windowing.

Errors
    Anything wrong with an input file raises :class:`LoadError` (a ``ValueError``) naming the
    file, a short reason (one of the ``REASON_*`` constants) and the fix; no other exception
    type escapes :func:`load_image`. Patient identifiers never appear in messages or logs: the
    identity is reduced to :func:`patient_key` at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsr.data import MODALITIES, MedImage, Window
from medsr.data.raster_modes import (
    converted_label,
    orientation,
    oriented,
    png16_luma,
    png_colour16,
    tiff_integer_dtype,
    tiff_layout_pillow_lacks,
    upright,
)

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
)
"""File name endings :func:`load_image` reads. Files with no extension (or a numeric one, as in
DICOM folders named by UID) and files with a DICOM ``DICM`` preamble are read as DICOM too."""

_DICOM_SUFFIXES = (".dcm", ".dicom")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# LoadError reasons: short fixed phrases, so that validation can count quarantined files by reason.
REASON_NOT_FOUND = "file not found"
REASON_EMPTY = "empty file"
REASON_UNKNOWN_TYPE = "unsupported file type"
REASON_NOT_DICOM = "not a DICOM file"
REASON_CORRUPT_DICOM = "truncated or corrupt DICOM"
REASON_NO_PIXEL_DATA = "no pixel data"
REASON_UNSUPPORTED_SYNTAX = "unsupported transfer syntax"
REASON_UNDECODABLE = "undecodable pixel data"
REASON_UNSUPPORTED_LAYOUT = "unsupported image layout"
REASON_NON_FINITE = "non-finite pixel values"
REASON_TOO_LARGE = "image too large"
REASON_UNREADABLE_NIFTI = "unreadable NIfTI"
REASON_UNREADABLE_IMAGE = "unreadable image"
REASON_OUTSIDE_ROOT = "file outside root"
REASON_INVALID_ARGUMENT = "invalid argument"
REASON_FRAME_OUT_OF_RANGE = "frame out of range"

# Robust percentile window, in percent.
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
# A slice pixel counts as foreground above this fraction of the window.
FOREGROUND_THRESHOLD = 0.05
# Percentiles over more values than this use an evenly strided subsample (same result to well
# within a grey level, at a fraction of the memory and time of a full sort).
_PERCENTILE_SAMPLE_LIMIT = 16_000_000

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

_NIFTI_ORIENTATION = "axial; rows anterior->posterior, columns patient right->left (radiological)"


class LoadError(ValueError):
    """A file cannot be turned into contract images.

    Attributes:
        path: the file, as given.
        reason: a short fixed phrase (``REASON_*``), fit for counting and tables.
        fix: what the user should do about it.
        detail: optional specifics (transfer syntax, sizes, the library's message).

    ``str()`` is ``"<path>: <reason>. Fix: <fix>"``, with `` (<detail>)`` after the reason when
    there is a detail.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: {self.reason}{detail}. Fix: {self.fix}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the exception picklable (Prefect and multiprocessing send exceptions across processes).
        return (type(self), (self.path, self.reason, self.fix, self.detail))


def patient_key(identity: str, salt: str = "medsr") -> str:
    """Salted SHA-256 of a patient identity, first 16 hex characters.

    Images of one patient share a key (so the split can keep a patient on one side) while the
    raw identity (PatientID, file name holding a patient number) is never stored or logged.
    """
    return hashlib.sha256(f"{salt}{identity}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def load_image(
    path: Path,
    modality: str,
    *,
    root: Path | None = None,
    patient_ids: Mapping[str, str] | None = None,
    max_pixels: int = 100_000_000,
    slice_step: int = 1,
    min_foreground_fraction: float = 0.0,
) -> list[MedImage]:
    """Load one file of any supported format into contract images.

    The format is chosen by content, then name: a ``DICM`` preamble means DICOM whatever the
    name; then ``.nii``/``.nii.gz`` NIfTI, ``.dcm``/``.dicom`` DICOM, ``.png``/``.jpg``/
    ``.jpeg``/``.tif``/``.tiff`` raster; a file with no (or a numeric) extension is tried as
    DICOM without preamble.

    Args:
        path: the file.
        modality: one of :data:`medsr.data.MODALITIES`.
        root: when given, ``MedImage.source`` is the path relative to it (POSIX), else the path.
        patient_ids: patient identity per file, keyed by the relative source path or the file
            name (NIH lists a "Patient ID" per image). An entry here wins over the identity the
            file itself gives.
        max_pixels: refuse a file with more pixels than this (all frames/slices of one volume
            together), checked from the header before any pixel is decoded.
        slice_step: keep every Nth frame or slice (0, N, 2N, ...) of a multi-frame file.
        min_foreground_fraction: drop slices of a volume (a NIfTI's slices, a multi-frame
            DICOM's frames) whose fraction of pixels above ``FOREGROUND_THRESHOLD`` (of the
            window) is below this: the empty slices above and below the body. A 2-D image
            (PNG/JPEG/TIFF pages, a single-frame DICOM) is never dropped by it: a dark one, e.g.
            12-bit values in a 16-bit PNG, is still a valid image.

    Returns:
        One :class:`MedImage` per kept frame or slice; empty when all were dropped.

    Raises:
        LoadError: for any problem with the file (and for invalid arguments).
    """
    path = Path(path)
    _check_request(path, modality, max_pixels, slice_step, min_foreground_fraction)
    kind = _detect_format(path)
    loader = {"dicom": load_dicom, "nifti": load_nifti, "raster": load_raster}[kind]
    return loader(path, modality, root=root, patient_ids=patient_ids, max_pixels=max_pixels,
                  slice_step=slice_step, min_foreground_fraction=min_foreground_fraction)


def _detect_format(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as err:
        raise LoadError(path, REASON_UNREADABLE_IMAGE, "check the file's permissions", detail=_describe(err)) from err
    if head[128:132] == b"DICM":
        return "dicom"
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return "dicom"
    if suffix in _RASTER_SUFFIXES:
        return "raster"
    # DICOM exports often have no extension, or are named by UID ("1.2.840....3").
    if suffix == "" or suffix[1:].isdigit():
        return "dicom"
    raise LoadError(path, REASON_UNKNOWN_TYPE,
                    f"give the file one of the extensions {', '.join(SUPPORTED_SUFFIXES)} if it is such an "
                    "image, or remove it from the raw folder", detail=f"extension {suffix!r}")


def _check_request(path: Path, modality: str, max_pixels: int, slice_step: int,
                   min_foreground_fraction: float) -> None:
    """Argument and file checks shared by every loader: cheap, before any parsing."""
    if modality not in MODALITIES:
        raise LoadError(path, REASON_INVALID_ARGUMENT, f"pass modality as one of {', '.join(MODALITIES)}",
                        detail=f"modality {modality!r}")
    if max_pixels < 1 or slice_step < 1 or not 0.0 <= min_foreground_fraction <= 1.0:
        raise LoadError(path, REASON_INVALID_ARGUMENT,
                        "use max_pixels >= 1, slice_step >= 1 and min_foreground_fraction in [0, 1]",
                        detail=f"max_pixels={max_pixels}, slice_step={slice_step}, "
                               f"min_foreground_fraction={min_foreground_fraction}")
    if not path.is_file():
        raise LoadError(path, REASON_NOT_FOUND, "check the path; the file may have been moved or not downloaded")
    if path.stat().st_size == 0:
        raise LoadError(path, REASON_EMPTY, "download or export the file again (it has 0 bytes)")


def _guarded(path: Path, kind: str, load: Callable[[], list[MedImage]]) -> list[MedImage]:
    """Run a loader so that only LoadError escapes: a library's surprise becomes a named reason."""
    try:
        return load()
    except LoadError:
        raise
    except MemoryError as err:
        raise LoadError(path, REASON_TOO_LARGE, "lower data.max_pixels in params.yaml or free memory",
                        detail=f"out of memory while loading the {kind}") from err
    except Exception as err:  # noqa: BLE001 - the contract: one exception type for bad input
        reason = {"DICOM": REASON_CORRUPT_DICOM, "NIfTI": REASON_UNREADABLE_NIFTI}.get(kind, REASON_UNREADABLE_IMAGE)
        raise LoadError(path, reason, f"re-export or re-download the {kind} file; check that it opens in a viewer",
                        detail=_describe(err)) from err


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _source_name(path: Path, root: Path | None) -> str:
    if root is None:
        return path.as_posix()
    for candidate, base in ((path, Path(root)), (path.resolve(), Path(root).resolve())):
        try:
            return candidate.relative_to(base).as_posix()
        except ValueError:
            continue
    raise LoadError(path, REASON_OUTSIDE_ROOT, f"pass a root that contains the file (root was {root})")


def _identity_key(source: str, path: Path, patient_ids: Mapping[str, str] | None, fallback: str) -> str:
    """patient_key of the identity: the caller's table first, then what the format provides."""
    if patient_ids:
        for key in (source, path.name):
            identity = patient_ids.get(key)
            if identity is not None and str(identity).strip():
                return patient_key(str(identity).strip())
    return patient_key(fallback)


def _check_size(path: Path, n_pixels: int, max_pixels: int, shape: Sequence[int]) -> None:
    if n_pixels > max_pixels:
        dims = "x".join(str(int(s)) for s in shape)
        raise LoadError(path, REASON_TOO_LARGE,
                        "raise data.max_pixels in params.yaml if the machine has the memory, "
                        "or split/downsample the file",
                        detail=f"shape {dims} = {n_pixels} pixels > max_pixels {max_pixels}")


# --------------------------------------------------------------------------------------------
# Windowing helpers shared by the formats
# --------------------------------------------------------------------------------------------


def _apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Original units -> contract pixels (float32, (1, H, W)), linear between low and high, clipped."""
    if not window.high > window.low:
        # Constant image: no contrast to map; zeros and no division by zero.
        return np.zeros((1, *values.shape), dtype=np.float32)
    scaled = (np.asarray(values, dtype=np.float64) - window.low) / (window.high - window.low)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if window.inverted:
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)[None]


def _strided_sample(arrays: Iterable[np.ndarray], total: int) -> np.ndarray:
    stride = max(1, math.ceil(total / _PERCENTILE_SAMPLE_LIMIT))
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel()[::stride] for a in arrays])


def _percentile_bounds(sample: np.ndarray) -> tuple[float, float]:
    """Robust window of a sample; min..max when the percentiles coincide (mostly-constant data)."""
    if sample.size == 0:
        return 0.0, 0.0
    low, high = (float(v) for v in np.percentile(sample, [PERCENTILE_LOW, PERCENTILE_HIGH]))
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    return low, high


def _raw_stats(values: np.ndarray) -> dict[str, float]:
    return {"raw_min": float(np.min(values)), "raw_max": float(np.max(values))}


def _frame_indices(n_frames: int, slice_step: int) -> range:
    return range(0, n_frames, slice_step)


def _enough_foreground(pixels: np.ndarray, min_foreground_fraction: float) -> bool:
    if min_foreground_fraction <= 0.0:
        return True
    return float(np.mean(pixels > FOREGROUND_THRESHOLD)) >= min_foreground_fraction


def _check_finite(path: Path, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise LoadError(path, REASON_NON_FINITE,
                        "re-export the image without NaN/inf (e.g. replace them with the background value)",
                        detail=f"{bad} NaN/inf values")


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

# Attributes that decide the modality LUT, the VOI and the spacing of a frame. Enhanced
# multi-frame files (e.g. enhanced CT) keep them in functional groups instead of the top level.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FRAME_ATTRIBUTES = (
    "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "PixelSpacing", "ImagerPixelSpacing",
)
_FUNCTIONAL_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
    "PixelMeasuresSequence": ("PixelSpacing",),
}

# Which pip packages decode which compressed transfer syntaxes (pydicom pixel-data plugins).
_PLUGINS_FOR_FAMILY = {
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
    "RLE": "pylibjpeg pylibjpeg-rle",
}
_CONVERT_HINT = ("or convert the file to an uncompressed transfer syntax first "
                 "(e.g. `gdcmconv --raw in.dcm out.dcm` or dcmtk's `dcmdjpeg`)")


def load_dicom(
    path: Path,
    modality: str,
    *,
    root: Path | None = None,
    patient_ids: Mapping[str, str] | None = None,
    max_pixels: int = 100_000_000,
    slice_step: int = 1,
    min_foreground_fraction: float = 0.0,
    frame: int | None = None,
) -> list[MedImage]:
    """Load a DICOM file: one image per frame kept (``frame`` = index in the file).

    ``frame`` (an index in the file) decodes that frame alone: the others are neither decoded
    nor counted against ``max_pixels`` (a 120-frame cine is as cheap as one frame), and a
    percentile window is that frame's own. ``extra["frames_in_file"]`` still gives the count;
    an index outside the file raises :class:`LoadError` (``REASON_FRAME_OUT_OF_RANGE``).

    Modality LUT then VOI (VOI LUT Sequence, else Window Center/Width, else robust percentiles;
    window semantics of DICOM PS3.3 C.11.2.1.2, as pydicom's ``apply_voi_lut``), MONOCHROME1
    inverted. Per-frame functional groups of enhanced multi-frame files are honoured. A VOI
    LUT Sequence is applied as the linear window over the input range where the LUT rises,
    because the window must stay linear and invertible; ``extra["voi_lut_nonlinear"]`` says
    when the LUT was not a straight line. A SIGMOID VOI function is likewise replaced by the
    linear window of the same centre and width (``extra["voi_function"]``).

    Patient identity: ``patient_ids`` entry, else PatientID, else StudyInstanceUID, else the
    source path. Spacing: PixelSpacing, else ImagerPixelSpacing (row, col, mm), when positive.
    See :func:`load_image` for the arguments.
    """
    path = Path(path)
    _check_request(path, modality, max_pixels, slice_step, min_foreground_fraction)
    source = _source_name(path, root)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)):
        raise LoadError(path, REASON_INVALID_ARGUMENT, "pass frame as an int index, or None for every frame",
                        detail=f"frame={frame!r}")
    return _guarded(path, "DICOM", lambda: _load_dicom(path, modality, source, patient_ids, max_pixels,
                                                        slice_step, min_foreground_fraction, frame))


def _load_dicom(path: Path, modality: str, source: str, patient_ids: Mapping[str, str] | None,
                max_pixels: int, slice_step: int, min_foreground_fraction: float,
                frame: int | None = None) -> list[MedImage]:
    ds, cut_short = _read_dicom_dataset(path)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if cut_short or _claims_to_be_image(ds):
            raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                            detail="the file ends before its Pixel Data element: it was cut short")
        raise LoadError(path, REASON_NO_PIXEL_DATA,
                        "remove non-image DICOM objects (structured reports, RT plans, ...) from the raw folder")
    rows, columns, n_frames = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0),
                               int(ds.get("NumberOfFrames") or 1))
    if rows < 1 or columns < 1 or n_frames < 1:
        raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                        detail=f"invalid geometry Rows={rows} Columns={columns} NumberOfFrames={n_frames}")
    if frame is not None and not 0 <= frame < n_frames:
        raise LoadError(path, REASON_FRAME_OUT_OF_RANGE, f"pass frame between 0 and {n_frames - 1}",
                        detail=f"frame {frame} of a file holding {n_frames} frame(s)")
    file_index = range(n_frames) if frame is None else [frame]  # the file's index of each decoded frame
    _check_size(path, rows * columns * len(file_index), max_pixels, (len(file_index), rows, columns))

    transfer_syntax = _transfer_syntax(path, ds)
    stored = _decode_dicom(path, ds, transfer_syntax, None if frame is None or n_frames == 1 else frame)
    if n_frames == 1 or frame is not None:
        stored = stored[None]
    if stored.shape[:3] != (len(file_index), rows, columns):
        raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                        detail=f"decoded shape {stored.shape} does not match the header")

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    extra_common: dict[str, Any] = {
        "format": "dicom", "transfer_syntax": transfer_syntax.name, "photometric": photometric,
        "frames_in_file": n_frames, "dicom_modality": str(ds.get("Modality", "")),
    }
    original_dtype = stored.dtype.name
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        frames = _dicom_monochrome_frames(path, ds, stored, file_index, photometric, slice_step)
    else:
        frames = _dicom_colour_frames(path, ds, stored, file_index, photometric, slice_step)

    identity = (str(ds.get("PatientID", "") or "").strip() or str(ds.get("StudyInstanceUID", "") or "").strip()
                or source)
    key = _identity_key(source, path, patient_ids, identity)
    images = []
    for index, values, window, spacing, extra in frames:
        pixels = _apply_window(values, window)
        # The foreground rule is for slices of a volume; a single-frame DICOM is one 2-D image.
        if n_frames > 1 and not _enough_foreground(pixels, min_foreground_fraction):
            continue
        images.append(MedImage(
            pixels=pixels, modality=modality, source=source, patient_key=key, original_dtype=original_dtype,
            window=window, spacing=spacing, frame=index if n_frames > 1 else None,
            extra={**extra_common, **extra, **_raw_stats(values)},
        ))
    logger.debug("%s: %d of %d frame(s) kept (%s)", source, len(images), n_frames, transfer_syntax.name)
    return images


def _read_dicom_dataset(path: Path) -> tuple[Any, bool]:
    """Parse a DICOM file: (dataset, whether the parser hit the end of the file early).

    A preamble-less file is accepted only when it looks like an image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    def parse(force: bool) -> tuple[Any, bool]:
        with warnings.catch_warnings(record=True) as caught:
            # pydicom reports a file cut short only as a warning (and drops the cut element).
            warnings.simplefilter("always")
            # Pixel data over 1 MiB is read when decoded, after the header checks (size guard).
            ds = pydicom.dcmread(path, force=force, defer_size="1 MiB")
        cut_short = any("end of file" in str(w.message).lower() for w in caught)
        return ds, cut_short

    try:
        return parse(force=False)
    except InvalidDicomError:
        pass
    except Exception as err:  # noqa: BLE001 - any parser failure means a damaged file
        raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                        detail=_describe(err)) from err
    not_dicom = LoadError(path, REASON_NOT_DICOM,
                          "check what the file is (it has no DICOM preamble and no image elements); "
                          "remove it or give it its real extension")
    try:
        ds, cut_short = parse(force=True)
    except Exception as err:  # noqa: BLE001 - a forced parse of a non-DICOM file fails in many ways
        raise not_dicom from err
    looks_like_image = "Rows" in ds and any(k in ds for k in _PIXEL_KEYWORDS)
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    # Random bytes parse into junk elements; a registered SOP class does not happen by chance.
    if not looks_like_image and sop_class.name == str(sop_class):
        raise not_dicom
    if not ds.file_meta.get("TransferSyntaxUID"):
        # No file meta: take the encoding pydicom detected while parsing.
        encoding = getattr(ds, "original_encoding", (None, None))
        syntax = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                  (False, False): ExplicitVRBigEndian}.get(tuple(encoding))
        if syntax is None:
            raise not_dicom
        ds.file_meta.TransferSyntaxUID = syntax
    return ds, cut_short


def _claims_to_be_image(ds: Any) -> bool:
    """True when a dataset without pixel data should have had some: then it was cut short.

    pydicom stops silently at the end of a file cut between elements, so a truncated image
    looks like a complete non-image object; its SOP class or image attributes tell them apart.
    """
    from pydicom.uid import UID

    if len(ds) == 0 or "Rows" in ds or "Columns" in ds:
        return True
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return sop_class is None or "Image Storage" in UID(str(sop_class)).name


def _transfer_syntax(path: Path, ds: Any) -> Any:
    """The file's transfer syntax, after checking that an installed plugin can decode it."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = ds.file_meta.get("TransferSyntaxUID")
    if not uid:
        raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                        detail="no Transfer Syntax UID in the file meta information")
    uid = UID(str(uid))
    label = f"{uid} ({uid.name})" if uid.name != str(uid) else f"{uid} (unknown)"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise LoadError(path, REASON_UNSUPPORTED_SYNTAX,
                        f"no pydicom pixel-data plugin decodes this syntax; {_plugin_advice(uid)}",
                        detail=f"transfer syntax {label}") from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise LoadError(path, REASON_UNSUPPORTED_SYNTAX, _plugin_advice(uid),
                        detail=f"transfer syntax {label}: no decoder installed ({missing})")
    return uid


def _plugin_advice(uid: Any) -> str:
    from pydicom import uid as uids

    families = (("JPEG 2000", uids.JPEG2000TransferSyntaxes), ("JPEG-LS", uids.JPEGLSTransferSyntaxes),
                ("JPEG", uids.JPEGTransferSyntaxes), ("RLE", uids.RLETransferSyntaxes))
    for family, members in families:
        if uid in members:
            return f"install the {family} decoder: `pip install {_PLUGINS_FOR_FAMILY[family]}`, {_CONVERT_HINT}"
    return f"install a decoder that supports it (`pip install python-gdcm` covers the most), {_CONVERT_HINT}"


def _decode_dicom(path: Path, ds: Any, transfer_syntax: Any, index: int | None = None) -> np.ndarray:
    """Every frame of ``ds`` (pydicom's shape: no frame axis for one frame), or frame ``index`` alone."""
    from pydicom.pixels import pixel_array

    try:
        with warnings.catch_warnings():
            # pydicom warns on recoverable quirks (odd padding); hard failures raise below.
            warnings.simplefilter("ignore")
            if index is not None:
                return np.asarray(pixel_array(ds, index=index))
            return np.asarray(ds.pixel_array)
    except NotImplementedError as err:
        raise LoadError(path, REASON_UNSUPPORTED_SYNTAX, _plugin_advice(transfer_syntax),
                        detail=f"transfer syntax {transfer_syntax} ({transfer_syntax.name}): {_describe(err)}") from err
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - decoders raise ValueError, RuntimeError, OSError...
        if transfer_syntax.is_compressed:
            raise LoadError(path, REASON_UNDECODABLE,
                            f"the installed plugins failed on this stream; {_plugin_advice(transfer_syntax)}",
                            detail=f"transfer syntax {transfer_syntax} ({transfer_syntax.name}): "
                                   f"{_describe(err)}") from err
        raise LoadError(path, REASON_CORRUPT_DICOM, "download or export the file again",
                        detail=_describe(err)) from err


def _frame_view(ds: Any, index: int) -> Any:
    """A small dataset holding what decides frame ``index``'s modality LUT, VOI and spacing."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword in _FRAME_ATTRIBUTES:
        if keyword in ds:
            view.add(ds[keyword])  # the element itself: keeps ambiguous VRs (LUT Data US/OW)
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])  # per-frame values override shared ones
    for group in groups:
        for sequence, keywords in _FUNCTIONAL_GROUPS.items():
            if group.get(sequence):
                item = group[sequence][0]
                for keyword in keywords:
                    if keyword in item:
                        view.add(item[keyword])
    view.file_meta = ds.file_meta  # LUT Data in OW needs the byte order
    return view


def _dicom_spacing(view: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = view.get(keyword)
        if value is not None and len(value) == 2:
            spacing = (float(value[0]), float(value[1]))
            if all(math.isfinite(s) and s > 0 for s in spacing):
                return spacing
    return None


FrameResult = tuple[int, np.ndarray, Window, tuple[float, float] | None, dict[str, Any]]


def _dicom_monochrome_frames(path: Path, ds: Any, stored: np.ndarray, file_index: Sequence[int], photometric: str,
                             slice_step: int) -> Iterator[FrameResult]:
    """Frames of ``stored`` (row ``i`` is the file's frame ``file_index[i]``), every ``slice_step``-th."""
    from pydicom.pixels import apply_modality_lut

    n_frames = stored.shape[0]
    inverted = photometric == "MONOCHROME1"
    views = [_frame_view(ds, index) for index in file_index]

    def units(index: int) -> np.ndarray:
        return np.asarray(apply_modality_lut(stored[index], views[index]), dtype=np.float64)

    # Checked over all frames before the first is handed out: finiteness and constancy.
    file_min, file_max = math.inf, -math.inf
    for index in range(n_frames):
        values = units(index)
        _check_finite(path, values)
        file_min, file_max = min(file_min, float(values.min())), max(file_max, float(values.max()))

    percentile: tuple[float, float] | None = None

    def percentile_window() -> tuple[float, float]:
        nonlocal percentile
        if percentile is None:
            percentile = _percentile_bounds(
                _strided_sample((units(i) for i in range(n_frames)), stored.size))
        return percentile

    for index in _frame_indices(n_frames, slice_step):
        values = units(index)
        extra: dict[str, Any] = {}
        if file_min == file_max:
            window = Window(low=file_min, high=file_max, method="percentile", inverted=inverted)
        else:
            header = _dicom_voi_window(views[index], extra)
            if header is not None:
                low, high, method, flips = header
                window = Window(low=low, high=high, method=method, inverted=inverted ^ flips)
            else:
                low, high = percentile_window()
                window = Window(low=low, high=high, method="percentile", inverted=inverted)
        yield file_index[index], values, window, _dicom_spacing(views[index]), extra


def _dicom_voi_window(view: Any, extra: dict[str, Any]) -> tuple[float, float, str, bool] | None:
    """(low, high, method, flips) from the file's VOI, or None to use the percentile window.

    Same preference as pydicom's ``apply_voi_lut``: a VOI LUT Sequence before Window
    Center/Width. ``flips`` is True for a decreasing VOI LUT (it inverts the display).
    """
    from pydicom.pixels import apply_voi

    sequence = view.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        entries, first_mapped, _bits = (int(v) for v in sequence[0].LUTDescriptor)
        entries = entries or 2**16
        domain = np.arange(first_mapped, first_mapped + entries, dtype=np.int64)
        # pydicom parses the LUT (US/OW, byte order): read the curve back over its input domain.
        curve = np.asarray(apply_voi(domain, view), dtype=np.float64)
        moved_from_start = np.flatnonzero(curve != curve[0])
        if moved_from_start.size:
            start = int(moved_from_start[0]) - 1
            end = int(np.flatnonzero(curve != curve[-1])[-1]) + 1
            segment = curve[start:end + 1]
            line = np.linspace(segment[0], segment[-1], segment.size)
            # More than one LUT step off a straight line: the LUT's shape is not reproduced.
            step = abs(segment[-1] - segment[0]) / max(segment.size - 1, 1)
            if np.max(np.abs(segment - line)) > step + 1e-9:
                extra["voi_lut_nonlinear"] = True
            return float(first_mapped + start), float(first_mapped + end), "voi_lut", bool(curve[-1] < curve[0])
        extra["voi_note"] = "flat VOI LUT ignored"

    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        center_element, width_element = view["WindowCenter"], view["WindowWidth"]
        center = float(center_element.value[0] if center_element.VM > 1 else center_element.value)
        width = float(width_element.value[0] if width_element.VM > 1 else width_element.value)
        function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "LINEAR":
            # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped outside.
            if width > 1:
                half = (width - 1) / 2
                return center - 0.5 - half, center - 0.5 + half, "dicom_window", False
        elif width > 0:
            # LINEAR_EXACT is c -/+ w/2; SIGMOID is given the linear window of the same c, w.
            if function != "LINEAR_EXACT":
                extra["voi_function"] = f"{function} replaced by LINEAR_EXACT (window must stay linear)"
            return center - width / 2, center + width / 2, "dicom_window", False
        extra["voi_note"] = f"invalid window (width {width}, function {function}) ignored"
    return None


def _dicom_colour_frames(path: Path, ds: Any, stored: np.ndarray, file_index: Sequence[int], photometric: str,
                         slice_step: int) -> Iterator[FrameResult]:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(stored, ds))
        bits = rgb.dtype.itemsize * 8  # the LUT entries' depth (8 or 16), not the indices'
    elif stored.ndim == 4 and stored.shape[-1] == 3:
        rgb = stored  # pydicom has already turned YBR into RGB
        bits = int(ds.get("BitsStored") or 8)
    else:
        bits = 0
    if not bits:
        raise LoadError(path, REASON_UNSUPPORTED_LAYOUT, "convert the image to MONOCHROME2 or RGB",
                        detail=f"photometric interpretation {photometric}, decoded shape {stored.shape}")
    levels = float(2**bits - 1)
    spacing = _dicom_spacing(_frame_view(ds, 0))
    constant = bool(rgb.min() == rgb.max())
    for index in _frame_indices(stored.shape[0], slice_step):
        values = np.asarray(rgb[index], dtype=np.float64) @ _LUMA_WEIGHTS
        _check_finite(path, values)
        if constant:
            window = Window(low=float(values.flat[0]), high=float(values.flat[0]), method="dtype_range")
        else:
            window = Window(low=0.0, high=levels, method="dtype_range")
        yield file_index[index], values, window, spacing, {"converted": f"{photometric} to grayscale (ITU-R 601-2 luma)",
                                               "converted_as": converted_label(photometric), "colour_bits": bits}


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def load_nifti(
    path: Path,
    modality: str,
    *,
    root: Path | None = None,
    patient_ids: Mapping[str, str] | None = None,
    max_pixels: int = 100_000_000,
    slice_step: int = 1,
    min_foreground_fraction: float = 0.0,
) -> list[MedImage]:
    """Load a NIfTI volume as axial slices (``frame`` = slice index, inferior -> superior).

    The volume is first brought to RAS+ with ``nibabel.as_closest_canonical``. Each slice is
    then shown the radiological way: rows run anterior (top) -> posterior, columns run patient
    right (image left) -> patient left. In world terms, pixel ``(r, c)`` of slice ``k`` is
    canonical voxel ``(nx - 1 - c, ny - 1 - r, k)``: world x decreases along a row, world y
    decreases down a column, world z increases with ``frame``. Spacing is the canonical
    (y, x) zooms.

    One window for the whole volume: the 0.5..99.5 percentiles of its non-zero voxels. A 4-D
    file contributes its first volume (``extra["note"]`` says so). One file is one patient
    (identity: ``patient_ids`` entry, else the source path). See :func:`load_image`.
    """
    path = Path(path)
    _check_request(path, modality, max_pixels, slice_step, min_foreground_fraction)
    source = _source_name(path, root)
    return _guarded(path, "NIfTI", lambda: _load_nifti(path, modality, source, patient_ids, max_pixels,
                                                        slice_step, min_foreground_fraction))


def _load_nifti(path: Path, modality: str, source: str, patient_ids: Mapping[str, str] | None,
                max_pixels: int, slice_step: int, min_foreground_fraction: float) -> list[MedImage]:
    import nibabel as nib

    unreadable_fix = "re-download or re-export the volume; check that it opens in a viewer (e.g. ITK-SNAP)"
    try:
        image = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - nibabel raises ImageFileError, OSError, gzip/zlib errors
        raise LoadError(path, REASON_UNREADABLE_NIFTI, unreadable_fix, detail=_describe(err)) from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)) or getattr(image, "affine", None) is None:
        raise LoadError(path, REASON_UNSUPPORTED_LAYOUT, "provide a NIfTI-1/2 volume with an affine",
                        detail=f"{type(image).__name__} has no spatial affine")
    shape = tuple(int(s) for s in image.shape)
    dtype = np.dtype(image.get_data_dtype())
    if len(shape) < 2 or dtype.kind not in "biuf":
        raise LoadError(path, REASON_UNSUPPORTED_LAYOUT, "provide a scalar 2-D, 3-D or 4-D volume",
                        detail=f"shape {shape}, data type {dtype}")
    spatial = shape[:3] if len(shape) >= 3 else (*shape, 1)
    _check_size(path, math.prod(spatial), max_pixels, spatial)

    extra: dict[str, Any] = {"format": "nifti", "orientation": _NIFTI_ORIENTATION,
                             "volume_shape": list(spatial), "original_axes": "".join(nib.aff2axcodes(image.affine))}
    try:
        if len(shape) > 3:
            # Read only the first volume from disk (an fMRI series can be gigabytes).
            first = np.asarray(image.dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)])
            image = type(image)(first, image.affine, image.header)
            extra["note"] = f"{len(shape)}-D volume of shape {list(shape)}: only the first volume is used"
            extra["volume_index"] = 0
        elif len(shape) == 2:
            image = type(image)(np.asarray(image.dataobj)[:, :, None], image.affine, image.header)
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as err:  # noqa: BLE001 - truncated gzip, short data block...
        raise LoadError(path, REASON_UNREADABLE_NIFTI, unreadable_fix, detail=_describe(err)) from err
    _check_finite(path, data)
    zooms = canonical.header.get_zooms()[:3]
    spacing = (float(zooms[1]), float(zooms[0]))

    if float(data.min()) == float(data.max()):
        value = float(data.flat[0])
        window = Window(low=value, high=value, method="percentile")
    else:
        foreground = data[data != 0]
        low, high = _percentile_bounds(_strided_sample([foreground], foreground.size))
        if not high > low:  # e.g. a constant object on a zero background
            low, high = float(data.min()), float(data.max())
        window = Window(low=low, high=high, method="percentile")

    key = _identity_key(source, path, patient_ids, source)
    images = []
    for index in _frame_indices(data.shape[2], slice_step):
        # RAS+ (x, y) -> rows from +y (anterior) down, columns from +x (patient right) across.
        values = np.ascontiguousarray(data[::-1, ::-1, index].T)
        pixels = _apply_window(values, window)
        if not _enough_foreground(pixels, min_foreground_fraction):
            continue
        images.append(MedImage(
            pixels=pixels, modality=modality, source=source, patient_key=key, original_dtype=dtype.name,
            window=window, spacing=spacing, frame=index, extra={**extra, **_raw_stats(values)},
        ))
    logger.debug("%s: %d of %d slice(s) kept", source, len(images), data.shape[2])
    return images


# --------------------------------------------------------------------------------------------
# Raster (PNG, JPEG, TIFF)
# --------------------------------------------------------------------------------------------


def load_raster(
    path: Path,
    modality: str,
    *,
    root: Path | None = None,
    patient_ids: Mapping[str, str] | None = None,
    max_pixels: int = 100_000_000,
    slice_step: int = 1,
    min_foreground_fraction: float = 0.0,
) -> list[MedImage]:
    """Load a PNG, JPEG or TIFF with Pillow (each page of a multi-page TIFF is a frame).

    Window = the stored dtype's range (``"dtype_range"``): 0..255 for 8-bit, 0..65535 for
    16-bit. Colour, palette and alpha images become grayscale with Pillow's ``convert("L")``
    (``extra["converted"]`` says so). 32-bit float TIFFs get the percentile window. Patient
    identity: ``patient_ids`` entry (by relative path or file name), else the file stem.
    See :func:`load_image`.
    """
    path = Path(path)
    _check_request(path, modality, max_pixels, slice_step, min_foreground_fraction)
    source = _source_name(path, root)
    return _guarded(path, "image", lambda: _load_raster(path, modality, source, patient_ids, max_pixels,
                                                         slice_step, min_foreground_fraction))


def _load_raster(path: Path, modality: str, source: str, patient_ids: Mapping[str, str] | None,
                 max_pixels: int, slice_step: int, min_foreground_fraction: float) -> list[MedImage]:
    from PIL import Image, UnidentifiedImageError

    unreadable_fix = "re-download or re-export the image; check that it opens in an image viewer"
    with warnings.catch_warnings():
        # Pillow's own decompression-bomb limit is replaced by max_pixels (checked below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as err:
            raise LoadError(path, REASON_TOO_LARGE, "split or downsample the image", detail=_describe(err)) from err
        except (UnidentifiedImageError, OSError, ValueError) as err:
            layout = tiff_layout_pillow_lacks(path)
            if layout is not None:  # a valid TIFF in a sample type Pillow does not read: say so
                raise LoadError(path, REASON_UNSUPPORTED_LAYOUT, "save it as 32-bit float or 16-bit integer TIFF "
                                "(e.g. tifffile.imwrite(path, array.astype('float32')))",
                                detail=f"{layout} TIFF: the TIFF reader here (Pillow) reads at most 32-bit "
                                "samples") from err
            raise LoadError(path, REASON_UNREADABLE_IMAGE, unreadable_fix, detail=_describe(err)) from err
        with opened as image:
            width, height = image.size
            n_frames = int(getattr(image, "n_frames", 1) or 1)
            _check_size(path, width * height * n_frames, max_pixels, (n_frames, height, width))
            key = _identity_key(source, path, patient_ids, path.stem)
            images = []
            for index in _frame_indices(n_frames, slice_step):
                try:
                    image.seek(index)
                    turned = orientation(image)
                    values, window, original_dtype, extra = _raster_frame(path, upright(image), turned)
                    if turned != 1:
                        extra["exif_orientation_applied"] = turned
                except LoadError:
                    raise
                except (OSError, ValueError, SyntaxError) as err:
                    raise LoadError(path, REASON_UNREADABLE_IMAGE, unreadable_fix, detail=_describe(err)) from err
                # No foreground rule: a raster (or TIFF page) is a 2-D image, not a slice of a
                # volume, and a dark one (12-bit values in a 16-bit PNG) is still valid.
                pixels = _apply_window(values, window)
                images.append(MedImage(
                    pixels=pixels, modality=modality, source=source, patient_key=key, original_dtype=original_dtype,
                    window=window, spacing=None, frame=index if n_frames > 1 else None,
                    extra={"format": (image.format or "").lower(), "mode": image.mode, **extra, **_raw_stats(values)},
                ))
    logger.debug("%s: %d of %d frame(s) kept", source, len(images), n_frames)
    return images


def _raster_frame(path: Path, image: Any, turned: int = 1) -> tuple[np.ndarray, Window, str, dict[str, Any]]:
    """(values in stored units, window, stored dtype name, notes) of the current frame; ``image``
    is already upright, ``turned`` the EXIF orientation that made it so."""
    mode = image.mode
    extra: dict[str, Any] = {}
    colour16 = png_colour16(path) if (image.format or "").upper() == "PNG" else None
    tiff_dtype = tiff_integer_dtype(image)
    if colour16 is not None:
        values = oriented(png16_luma(path, colour16), turned)
        low, high, method, dtype_name = 0.0, 65535.0, "dtype_range", "uint16"
        extra["converted"] = f"16-bit {colour16.upper()} to 16-bit grayscale (ITU-R 601-2 luma, alpha dropped)"
        extra["converted_as"] = converted_label(colour16)
    elif tiff_dtype is not None and tiff_dtype != "uint16":
        values = np.asarray(image)
        info = np.iinfo(tiff_dtype)
        low, high = _percentile_bounds(_strided_sample([values], values.size)) if tiff_dtype == "int16" else (
            float(info.min), float(info.max))
        method, dtype_name = ("percentile" if tiff_dtype == "int16" else "dtype_range"), tiff_dtype
    elif mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint16)  # big-endian modes come back as >u2
        low, high, method, dtype_name = 0.0, 65535.0, "dtype_range", "uint16"
    elif mode == "L":
        values = np.asarray(image)
        low, high, method, dtype_name = 0.0, 255.0, "dtype_range", "uint8"
    elif mode == "I":
        values = np.asarray(image)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            # Pillow widens some 16-bit files to 32-bit integer mode.
            low, high, method, dtype_name = 0.0, 65535.0, "dtype_range", "uint16"
            extra["note"] = "32-bit integer image holding 16-bit values: 16-bit range used"
        else:
            low, high = _percentile_bounds(_strided_sample([values], values.size))
            method, dtype_name = "percentile", "int32"
    elif mode == "F":
        values = np.asarray(image)
        _check_finite(path, values)
        low, high = _percentile_bounds(_strided_sample([values], values.size))
        method, dtype_name = "percentile", "float32"
    else:
        values = np.asarray(image.convert("L"))
        low, high, method, dtype_name = 0.0, 255.0, "dtype_range", "uint8"
        extra["converted"] = f"{mode} to grayscale L (ITU-R 601-2 luma)"
        extra["converted_as"] = converted_label(mode)
    if values.ndim != 2:
        raise LoadError(path, REASON_UNSUPPORTED_LAYOUT, "save the image as single-channel grayscale",
                        detail=f"mode {mode}, array shape {values.shape}")
    values = values.astype(np.float64)
    _check_finite(path, values)
    if values.size and float(values.min()) == float(values.max()):
        low = high = float(values.flat[0])
    return values, Window(low=low, high=high, method=method), dtype_name, extra
