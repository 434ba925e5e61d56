"""Uploaded files: what format they are, reading them as contract images, and the /upscale pipeline.

Every problem with an upload becomes an :class:`InputError` whose ``kind`` the service maps to
a 4xx status (:mod:`serving.errors`); its text never holds the upload's name or path (they can
hold patient names). :func:`upscale_file` times each phase of a request into a
:class:`medsr.inference.PhaseTimer`: ``read`` (bytes, format sniffing, header checks),
``decode`` (parsing, decoding and intensity windowing: the loaders do all three), ``window``
and ``forward`` (tiling and the network), ``refine`` (an optional step between the network and
the score), ``consistency``, ``encode`` (values back to stored units and the codec) and
``write`` (the container: DICOM dataset, NIfTI header).
"""

from __future__ import annotations

import functools
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Imported with the module (at service start), not inside the first request: the loaders and writers
# pull in pydicom, nibabel and the codecs, ~10-20 ms that no phase of that request would account for.
from medsr.data import MODALITIES, MODALITY_OF_DICOM, writing
from medsr.data.loading import LoadError, load_dicom, load_nifti, load_raster
from medsr.inference import PhaseTimer, Upscaler, describe_size, output_pixels, side_for
from medsr.tracking import LoadedGenerator


class InputError(ValueError):
    """A request's image cannot be processed; ``kind`` classifies it.

    Kinds: ``malformed`` (corrupt, truncated, empty), ``unsupported_media`` (not an image
    format we read), ``too_large``, ``unprocessable`` (valid file, but not something we can
    upscale: NaN pixels, several frames where one was expected, a scale without a model).
    ``str()`` never contains a file name or path.
    """

    KINDS = ("malformed", "unsupported_media", "too_large", "unprocessable")

    def __init__(self, kind: str, error: str, fix: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown InputError kind {kind!r}")
        self.kind = kind
        self.error = error
        self.fix = fix
        super().__init__(f"{error}. Fix: {fix}")


FILE_FORMATS: tuple[str, ...] = ("dicom", "nifti", "png", "tiff", "jpeg")
_UPLOAD_NAMES = {"dicom": "upload.dcm", "nifti": "upload.nii", "nifti-gz": "upload.nii.gz",
                 "png": "upload.png", "tiff": "upload.tif", "jpeg": "upload.jpg"}
SUPPORTED_UPLOADS = "DICOM (.dcm), NIfTI (.nii, .nii.gz), PNG, TIFF or JPEG"
_RAW_SYNTAX_HINT = "re-export it uncompressed (e.g. `gdcmconv --raw in.dcm out.dcm` or dcmtk's `dcmdjpeg in.dcm out.dcm`)"


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

    if requested:
        if requested not in MODALITIES:
            raise InputError("unprocessable", f"unknown modality {requested!r}",
                             f"pass modality as one of {', '.join(MODALITIES)}, or leave it out to infer it")
        return requested
    if file_format == "dicom":
        # A code without a modality of its own is treated as a radiograph, as a PNG or TIFF is.
        return MODALITY_OF_DICOM.get(str(images[0].extra.get("dicom_modality", "")).upper(), "xray")
    return "mri" if file_format == "nifti" else "xray"


_LOAD_KINDS = {
    "empty file": "malformed", "truncated or corrupt DICOM": "malformed", "unreadable image": "malformed",
    "unreadable NIfTI": "malformed", "undecodable pixel data": "malformed",
    "not a DICOM file": "unsupported_media", "unsupported file type": "unsupported_media",
    "image too large": "too_large",
}


def _input_error_from_load(err: Exception, names: Sequence[str], max_output_pixels: int, scale: int) -> InputError:
    """A LoadError as an InputError whose message holds no path (the upload's name is the user's)."""
    reason = getattr(err, "reason", "unreadable image")
    detail = getattr(err, "detail", "") or ""
    for text in sorted(set(names), key=len, reverse=True):
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
    elif reason == "undecodable pixel data":
        # The loader's advice is to install a decoder, but the decoders are installed: they failed.
        fix = f"the installed decoders could not decode this compressed stream (damaged, or a coding they lack); {_RAW_SYNTAX_HINT}"
    return InputError(kind, message, fix)


def _check_dicom_pixel_data(path: Path) -> None:
    """Refuse, with the right words, a DICOM whose Pixel Data is missing or empty.

    The loader calls a complete image header without Pixel Data "truncated", and zero-length
    Pixel Data fails deep inside pydicom; both are the sender's object, not a damaged file.
    """
    import pydicom

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True, defer_size="1 KiB")
    except Exception:  # noqa: BLE001 - the loader classifies unreadable files itself
        return
    if any("end of file" in str(w.message).lower() for w in caught):
        return  # cut short: the loader says so
    if "Rows" not in ds or "Columns" not in ds or not ds.get("SOPClassUID"):
        return  # not a readable image header: the loader names what is wrong
    pixel_keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if pixel_keyword is None:
        raise InputError("unprocessable", "no pixel data: the DICOM object is complete but holds no image "
                         "(no Pixel Data element 7FE0,0010)",
                         "upload an image instance (CT, MR, CR, DX ...); structured reports, presentation states "
                         "and RT objects have nothing to upscale")
    # get_item: the raw element, so the deferred pixel data is not read just to be measured.
    element = ds.get_item(pixel_keyword)
    length = getattr(element, "length", None)
    if length is None:
        length = len(element.value or b"")
    if length == 0:
        raise InputError("malformed", "empty pixel data: the Pixel Data element has zero length",
                         "export the image again: its pixel values are missing from the file")


def read_upload(path: Path, *, scale: int, max_output_pixels: int, modality: str | None = None,
                name_hint: str = "", timer: PhaseTimer | None = None,
                dicom_frame: int | None = None) -> tuple[str, list[Any], str]:
    """Load an uploaded file as contract images: ``(file_format, images, modality)``.

    The format comes from the content (magic numbers), not the name. NIfTI volumes give every
    slice; multi-frame TIFF give every page and DICOM every frame (the caller picks one), or
    only frame ``dicom_frame`` of a DICOM: the others are not decoded, nor counted against the
    size limit. The loader refuses a file whose output at ``scale`` would exceed
    ``max_output_pixels`` before decoding it.

    Raises:
        InputError: for anything wrong with the file.
    """

    timer = timer or PhaseTimer()
    with timer.phase("read"):
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
        if kind == "dicom":
            _check_dicom_pixel_data(path)
    max_pixels = max(1, max_output_pixels // (scale * scale))
    loader: Callable[..., list[Any]] = {"dicom": load_dicom, "nifti": load_nifti, "nifti-gz": load_nifti}.get(
        kind, load_raster)
    if kind == "dicom" and dicom_frame is not None:
        loader = functools.partial(load_dicom, frame=dicom_frame)
    with timer.phase("decode"), tempfile.TemporaryDirectory(prefix="medsr-upload-") as tmp:
        # A neutral name: the loaders pick NIfTI by extension, and MedImage.source keeps no user file name.
        link = Path(tmp) / _UPLOAD_NAMES[kind]
        os.symlink(path.resolve(), link)
        try:
            images = loader(link, modality or "xray", root=Path(tmp), max_pixels=max_pixels, slice_step=1,
                            min_foreground_fraction=0.0)
        except LoadError as err:
            raise _input_error_from_load(err, [str(link), link.name, tmp, str(path), path.name],
                                         max_output_pixels, scale) from None
    if not images:
        raise InputError("unprocessable", "no image in the file", f"upload a file holding a 2-D image ({SUPPORTED_UPLOADS})")
    file_format = "nifti" if kind.startswith("nifti") else kind
    if file_format == "nifti" and images[0].extra.get("volume_index") is not None:
        shape = images[0].extra.get("note", "").split("shape ")[-1].split("]")[0] + "]"
        raise InputError("unprocessable", f"4-D NIfTI (shape {shape}): /upscale takes one 3-D volume, and "
                         "silently upscaling only the first would drop the others",
                         "extract the volume you want and upload it, e.g. `fslroi in.nii.gz vol3.nii.gz 3 1` or "
                         "nibabel `img.slicer[..., 3]`")
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
    # A DICOM read one frame at a time (read_upload's dicom_frame) says how many its file holds.
    count = int(images[0].extra.get("frames_in_file", len(images))) if file_format == "dicom" else len(images)
    if frame is None:
        if count > 1:
            raise InputError("unprocessable", f"multi-frame file: it holds {count} frames where a single frame was "
                             "expected", f"pass `frame` (0..{count - 1}) to upscale one frame, or upload one frame per file")
        return images
    if not 0 <= frame < count:
        raise InputError("unprocessable", f"frame {frame} out of range: the file holds {count} frame(s)",
                         f"pass `frame` between 0 and {count - 1}")
    # Fewer images than the file holds: the loader decoded the asked-for frame alone.
    return [images[frame]] if len(images) == count else images


_SCORER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medsr-score")


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
    timer: PhaseTimer
    converted: str | None = None  # e.g. "rgb->luma": colour/alpha input processed as one luma channel


def upscale_file(path: Path, generator: LoadedGenerator, upscaler: Upscaler, *, max_output_pixels: int,
                 modality: str | None = None, frame: int | None = None, name_hint: str = "", png_level: int = 1,
                 timer: PhaseTimer | None = None, before_compute: Callable[[], None] | None = None) -> FileResult:
    """Read an upload, super-resolve it with ``upscaler`` (``generator``'s network), and write it
    back in its own format; ``generator`` names the model in the output's provenance.

    ``before_compute`` runs on the computing thread before the network, the refinement and the
    score (the service sets that thread's torch threads: :mod:`serving.threads`).

    Raises:
        InputError: for anything wrong with the upload.
    """

    timer = timer or PhaseTimer()
    scale = generator.scale
    # One DICOM frame is decoded: the one asked for, or the first, which tells whether the file has more.
    file_format, images, chosen_modality = read_upload(path, scale=scale, max_output_pixels=max_output_pixels,
                                                       modality=modality, name_hint=name_hint, timer=timer,
                                                       dicom_frame=0 if frame is None else frame)
    chosen = select_frame(images, file_format, frame)
    total = sum(output_pixels(*image.pixels.shape[1:], scale) for image in chosen)
    if total > max_output_pixels:
        raise InputError("too_large", f"image too large: the output would have {total} pixels "
                         f"({describe_size(total)}), over serving.max_output_pixels = {max_output_pixels}",
                         "crop or downsample the image, use a smaller scale, or raise serving.max_output_pixels")
    prepare = before_compute or (lambda: None)
    results = []
    for image in chosen:
        prepare()
        raw = upscaler.network(image.pixels, timer)
        prepare()
        results.append(upscaler.refine(raw, image.pixels, timer))

    def score() -> list[float]:
        prepare()
        return [upscaler.score(result, image.pixels, timer) for image, result in zip(chosen, results, strict=True)]

    # The score and the encoder read the same results and release the GIL (torch, scipy, zlib):
    # run them side by side, so a request waits for the longer of the two, not their sum.
    scoring = _SCORER.submit(score)

    def derivation() -> str:
        mean = float(np.mean(scoring.result()))
        return (f"Super-resolution x{scale} by MedSR: generator {generator.architecture}, registered model "
                f"{generator.registered_name} version {generator.version}; consistency PSNR {mean:.1f} dB")

    try:
        if file_format == "dicom":
            content = writing.write_dicom(path, chosen, results, scale=scale, derivation=derivation, timer=timer)
            media_type, extension = writing.DICOM_MEDIA_TYPE, ".dcm"
        elif file_format == "nifti":
            content = writing.write_nifti(path, chosen, results, scale=scale, timer=timer)
            media_type = writing.NIFTI_MEDIA_TYPE
            extension = ".nii.gz" if writing.is_gzip(path) else ".nii"
        else:
            content = writing.write_raster(chosen, results, file_format, source=path, scale=scale,
                                           png_level=png_level, timer=timer)
            media_type, extension = writing.RASTER_MEDIA_TYPES[file_format], writing.RASTER_EXTENSIONS[file_format]
    except writing.WriteError as err:
        raise InputError("unprocessable", err.reason, err.fix) from None
    finally:
        scores = scoring.result()  # never leave the score running behind a failed write
    mean_score = float(np.mean(scores))
    height, width = chosen[0].pixels.shape[1:]
    return FileResult(content=content, media_type=media_type, filename=f"medsr_x{scale}{extension}",
                      file_format=file_format, modality=chosen_modality, frames=len(chosen),
                      input_size=(height, width), output_size=(height * scale, width * scale),
                      consistency_psnr=mean_score, consistency_min_psnr=float(np.min(scores)), timer=timer,
                      converted=chosen[0].extra.get("converted_as"))
