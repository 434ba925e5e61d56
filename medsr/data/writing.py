"""Write super-resolved images back in the format, units and dtype they came in.

The inverse of :mod:`medsr.data.loading` for results: a contract image goes back to original
units with :meth:`medsr.data.Window.to_units` (HU for CT), then to the source's stored dtype,
and is written as

* DICOM: a *derived* instance of the source (new SOP Instance and Series Instance UIDs, Rows,
  Columns and pixel spacing for the new grid, ImageType ``DERIVED\\SECONDARY``, a
  DerivationDescription naming the model, a SourceImageSequence pointing at the original),
  uncompressed Explicit VR Little Endian, stored values through the inverse of the source's
  rescale slope/intercept;
* NIfTI: the whole volume, every axial slice upscaled in-plane, affine and zooms for the new
  grid, in the source's own axis order and dtype (gzipped when the source was);
* PNG, TIFF, JPEG: the source's format and bit depth (8/16-bit, 32-bit float TIFF).

The model only ever sees the windowed image (see :mod:`medsr.data`), so values the window
clipped (bone above a soft-tissue CT window, the zero background below an MRI volume's
percentile window) would come back stuck at the window's bounds. :func:`final_units` adds back
what the window cut off, taken from the bicubic upsampling of the source's raw values: inside the
window the output is the model's, outside it is bicubic, and the two meet continuously.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsr.data import MedImage

if TYPE_CHECKING:
    from medsr.inference import PhaseTimer

DICOM_MEDIA_TYPE = "application/dicom"
NIFTI_MEDIA_TYPE = "application/octet-stream"
RASTER_MEDIA_TYPES: dict[str, str] = {"png": "image/png", "tiff": "image/tiff", "jpeg": "image/jpeg"}
RASTER_EXTENSIONS: dict[str, str] = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg"}


class WriteError(ValueError):
    """A result cannot be written back in its source's format; ``fix`` says what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. Fix: {fix}")


def _phase(timer: PhaseTimer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``encode`` (values to stored units, codec) and ``write`` (the container) for Server-Timing."""
    from medsr.inference import timed_phase  # lazily: torch is not needed to write a file

    return timed_phase(timer, name)


def units_of(image: MedImage, pixels: np.ndarray) -> np.ndarray:
    """A contract image ``(1, H, W)`` mapped to ``image``'s original units, as float64 ``(H, W)``."""
    return image.window.to_units(pixels)[0]


def final_units(image: MedImage, result: np.ndarray, raw: np.ndarray | None, scale: int) -> np.ndarray:
    """``result`` in original units, plus what the window clipped from the source (``raw``,
    the source frame in original units, ``(h, w)``; None when nothing can lie outside)."""
    import torch

    from medsr.ops import bicubic_upsample

    units = units_of(image, result)
    if raw is None:
        return units
    low, high = sorted((float(image.window.low), float(image.window.high)))
    if float(raw.min()) >= low and float(raw.max()) <= high:
        return units
    with torch.no_grad():
        upsampled = bicubic_upsample(torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None],
                                     scale)[0, 0].numpy()
    outside = upsampled - np.clip(upsampled, low, high)
    return units + outside


def cast_units(values: np.ndarray, dtype_name: str) -> np.ndarray:
    """Round and clip to an integer dtype's range, or cast to a float dtype."""
    dtype = np.dtype(dtype_name)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

_DICOM_STALE = ("SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                "LargestPixelValueInSeries", "IconImageSequence")


def _rescale_of(ds: Any, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: per-frame, then shared functional groups, then top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        sequence = group.get("PixelValueTransformationSequence")
        if sequence and "RescaleSlope" in sequence[0]:
            return float(sequence[0].RescaleSlope), float(sequence[0].get("RescaleIntercept", 0.0))
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _ds_number(value: float) -> str:
    """A Decimal String value that fits DICOM's 16 characters."""
    return f"{value:.8g}" if len(f"{value:.8g}") <= 16 else f"{value:.6g}"


def _scale_spacing(item: Any, scale: int) -> None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = item.get(keyword)
        if value is not None and len(value) == 2:
            spacing = [float(v) for v in value]
            if all(s > 0 for s in spacing):
                setattr(item, keyword, [_ds_number(s / scale) for s in spacing])


def _derived_image_type(values: Any) -> list[str]:
    """ImageType/FrameType with value 1 DERIVED and value 2 SECONDARY, later values kept."""
    if values is None or values == "":
        current: list[str] = []
    elif isinstance(values, str):
        current = [values]
    else:
        current = [str(v) for v in values]
    return ["DERIVED", "SECONDARY", *current[2:]]


def _direction_cosines(item: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(row direction, column direction) of an ImageOrientationPatient, or None when absent/invalid."""
    value = item.get("ImageOrientationPatient")
    if value is None or len(value) != 6:
        return None
    cosines = np.asarray([float(v) for v in value], dtype=np.float64)
    return cosines[:3], cosines[3:]


def _spacing_of(item: Any) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm of a PixelSpacing-like attribute."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = item.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def _first_of(groups: Sequence[Any], sequence: str) -> Any:
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _shifted_position(position: Any, cosines: tuple[np.ndarray, np.ndarray], spacing: tuple[float, float],
                      scale: int) -> list[str]:
    """ImagePositionPatient of the new first pixel: the centre of the top-left HR pixel.

    The HR grid keeps the field of view (pixel-centre convention, as the NIfTI writer does), so
    its first centre lies ``(1/scale - 1) / 2`` LR pixels up and left of the LR first centre.
    """
    row_direction, column_direction = cosines
    row_spacing, column_spacing = spacing
    offset = (1.0 / scale - 1.0) / 2.0
    moved = (np.asarray([float(v) for v in position], dtype=np.float64)
             + row_direction * column_spacing * offset + column_direction * row_spacing * offset)
    return [_ds_number(float(v)) for v in moved]


def _shift_positions(ds: Any, scale: int) -> None:
    """Move every ImagePositionPatient (top level and per frame) to the new grid's first pixel.

    Called before the spacing is scaled: the shift is in LR pixels of the source geometry.
    """
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    if "ImagePositionPatient" in ds:
        cosines, spacing = _direction_cosines(ds), _spacing_of(ds)
        if cosines is None:
            plane = _first_of(shared, "PlaneOrientationSequence")
            cosines = None if plane is None else _direction_cosines(plane)
        if spacing is None:
            measures = _first_of(shared, "PixelMeasuresSequence")
            spacing = None if measures is None else _spacing_of(measures)
        if cosines is not None and spacing is not None:
            ds.ImagePositionPatient = _shifted_position(ds.ImagePositionPatient, cosines, spacing, scale)
    for group in ds.get("PerFrameFunctionalGroupsSequence") or []:
        own = [group, *shared]
        position = _first_of([group], "PlanePositionSequence")
        plane = _first_of(own, "PlaneOrientationSequence")
        measures = _first_of(own, "PixelMeasuresSequence")
        if position is None or "ImagePositionPatient" not in position or plane is None or measures is None:
            continue
        cosines, spacing = _direction_cosines(plane), _spacing_of(measures)
        if cosines is not None and spacing is not None:
            position.ImagePositionPatient = _shifted_position(position.ImagePositionPatient, cosines, spacing, scale)


_FLOAT_PIXEL_KEYWORDS: dict[str, str] = {"FloatPixelData": "<f4", "DoubleFloatPixelData": "<f8"}


def _unsigned_for(bits: int) -> str:
    return "uint8" if bits <= 8 else "uint16" if bits <= 16 else "uint32"


def _set_pixels(ds: Any, array: np.ndarray, photometric: str, bits_stored: int, float_keyword: str | None) -> None:
    """Pixel data and its attributes, with a new SOP Instance UID.

    pydicom's ``set_pixel_data`` takes 8- and 16-bit integers only: 32-bit stored values (RT
    Dose, some PET and CT) and float pixel data are written here, so they keep their depth
    instead of being forced into 16 bits.
    """
    from pydicom.uid import generate_uid

    if float_keyword is None and array.dtype.itemsize <= 2:
        ds.set_pixel_data(array, photometric, bits_stored, generate_instance_uid=True)
        return
    ds.Rows, ds.Columns = (int(side) for side in array.shape[-2:])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = array.dtype.itemsize * 8
    for keyword in ("PlanarConfiguration", "PixelData", *_FLOAT_PIXEL_KEYWORDS):
        if keyword in ds:
            delattr(ds, keyword)
    if float_keyword is not None:
        for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
            if keyword in ds:
                delattr(ds, keyword)
        setattr(ds, float_keyword, np.ascontiguousarray(array).tobytes())
    else:
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(array.dtype.kind == "i")
        ds.PixelData = np.ascontiguousarray(array).tobytes()
        ds["PixelData"].VR = "OW"
    if array.ndim == 3 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = array.shape[0] if array.ndim == 3 else 1
    ds.SOPInstanceUID = generate_uid()


def write_dicom(source: Path, images: Sequence[MedImage], results: Sequence[np.ndarray], *, scale: int,
                derivation: str | Callable[[], str], timer: PhaseTimer | None = None) -> bytes:
    """A derived DICOM instance holding ``results`` (contract images, one per frame of ``images``).

    ``images`` are the frames as :func:`medsr.data.loading.load_dicom` gave them (their
    ``frame`` says which frame of a multi-frame source each one is; ``None`` for a single-frame
    source). Returns the bytes of a Part 10 file in Explicit VR Little Endian, whatever the
    source's transfer syntax (big endian included). ImagePositionPatient (top level and per
    frame) moves to the centre of the new first pixel. ``derivation`` may be a callable, asked
    only once the pixels are encoded (the caller's score can run meanwhile).

    Raises:
        WriteError: the source's modality LUT is a lookup table (not invertible here).
    """
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if len(images) != len(results) or not images:
        raise ValueError("write_dicom needs one result per source frame")
    with _phase(timer, "write"):
        ds = pydicom.dcmread(source, force=True)
        if "ModalityLUTSequence" in ds:
            raise WriteError("the source uses a Modality LUT Sequence, which cannot be inverted to stored values",
                             "convert the file to rescale slope/intercept first or upload it as PNG/TIFF")
        frame_numbers = [image.frame if image.frame is not None else 0 for image in images]
        original_sop = (str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")))
        had_frames = "NumberOfFrames" in ds
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        float_keyword = next((k for k in _FLOAT_PIXEL_KEYWORDS if k in ds), None)
        # Decoded in the source's byte order; the result is always written little endian.
        source_pixels = None if colour else np.asarray(ds.pixel_array)
    with _phase(timer, "encode"):
        if source_pixels is not None and source_pixels.ndim == 2:
            source_pixels = source_pixels[None]
        stored_frames = []
        for image, result, frame in zip(images, results, frame_numbers, strict=True):
            if colour:  # the loader turned colour into luma in stored units
                stored = units_of(image, result)
            else:
                slope, intercept = _rescale_of(ds, frame)
                raw = source_pixels[frame].astype(np.float64) * slope + intercept
                stored = (final_units(image, result, raw, scale) - intercept) / (slope or 1.0)
            if float_keyword is not None:  # float pixel data: stored as is, no rescale
                stored_frames.append(stored.astype(_FLOAT_PIXEL_KEYWORDS[float_keyword]))
                continue
            if colour:  # luma at the colour samples' depth (a PALETTE COLOR LUT's entries)
                bits_stored = int(image.extra.get("colour_bits") or bits_stored)
            dtype = np.dtype(image.original_dtype if not colour else _unsigned_for(bits_stored))
            if dtype.kind not in "iu" or dtype.itemsize > 4:
                dtype = np.dtype("int16" if int(ds.get("PixelRepresentation", 0)) else "uint16")
            dtype = dtype.newbyteorder("<")
            bits_stored = min(bits_stored, dtype.itemsize * 8)
            signed = dtype.kind == "i"
            low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2 ** bits_stored - 1)
            stored_frames.append(np.clip(np.rint(stored), low, high).astype(dtype))
        array = stored_frames[0] if len(stored_frames) == 1 else np.stack(stored_frames)

    with _phase(timer, "write"):
        if colour:
            for keyword in ("PlanarConfiguration", "RedPaletteColorLookupTableDescriptor",
                            "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor",
                            "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
                            "BluePaletteColorLookupTableData"):
                if keyword in ds:
                    delattr(ds, keyword)
            photometric = "MONOCHROME2"
        if ds.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
            # set_pixel_data keeps an uncompressed source's syntax, and save_as refuses to change
            # byte order or VR encoding: decode every element in the source's encoding first,
            # then declare the one this writer produces.
            for _element in ds.iterall():
                pass
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.set_original_encoding(False, True)
        _set_pixels(ds, array, photometric, bits_stored, float_keyword)
        if had_frames:  # enhanced/multi-frame IODs require the element even for one frame
            ds.NumberOfFrames = len(stored_frames)

        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame:
            ds.PerFrameFunctionalGroupsSequence = [per_frame[n] for n in frame_numbers if n < len(per_frame)]
        _shift_positions(ds, scale)
        groups = list(ds.get("PerFrameFunctionalGroupsSequence") or []) + list(ds.get("SharedFunctionalGroupsSequence") or [])
        _scale_spacing(ds, scale)
        for group in groups:
            for measures in group.get("PixelMeasuresSequence") or []:
                _scale_spacing(measures, scale)
            for frame_type_sequence in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
                for item in group.get(frame_type_sequence) or []:
                    if "FrameType" in item:
                        item.FrameType = _derived_image_type(item.FrameType)

        ds.ImageType = _derived_image_type(ds.get("ImageType"))
        ds.DerivationDescription = (derivation if isinstance(derivation, str) else derivation())[:1024]
        ds.SeriesInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if ds.get("SOPClassUID"):
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        now = dt.datetime.now()
        ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        description = str(ds.get("SeriesDescription", "") or "").strip()
        ds.SeriesDescription = f"{description} MedSR x{scale}".strip()[:64]
        if all(original_sop):
            reference = Dataset()
            reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = original_sop
            if had_frames:
                reference.ReferencedFrameNumber = [n + 1 for n in frame_numbers]
            ds.SourceImageSequence = [reference]
        for keyword in _DICOM_STALE:
            if keyword in ds:
                delattr(ds, keyword)

        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def write_nifti(source: Path, images: Sequence[MedImage], results: Sequence[np.ndarray], *, scale: int,
                timer: PhaseTimer | None = None) -> bytes:
    """The source volume with every axial slice replaced by its upscaled version.

    ``images`` must be every slice of the (first) volume, as :func:`load_nifti` gives them with
    ``slice_step=1`` and no foreground filter; the slices go back from the radiological display
    orientation to canonical RAS+, the in-plane voxel size shrinks by ``scale`` (pixel-centre
    convention, so the field of view is unchanged), and the volume is reoriented to the
    source's own axis order.
    """
    if len(images) != len(results) or not images:
        raise ValueError("write_nifti needs one result per slice")
    with _phase(timer, "encode"):
        volume, canonical, original = _nifti_volume(source, images, results, scale)
    with _phase(timer, "write"):
        return _nifti_bytes(source, volume, canonical, original, scale)


def _nifti_volume(source: Path, images: Sequence[MedImage], results: Sequence[np.ndarray], scale: int
                  ) -> tuple[np.ndarray, Any, Any]:
    import nibabel as nib

    original = nib.load(str(source))
    if len(original.shape) > 3:
        first = np.asarray(original.dataobj[(slice(None),) * 3 + (0,) * (len(original.shape) - 3)])
        original = type(original)(first, original.affine, original.header)
    elif len(original.shape) == 2:
        original = type(original)(np.asarray(original.dataobj)[:, :, None], original.affine, original.header)
    canonical = nib.as_closest_canonical(original)
    raw_volume = np.asarray(canonical.get_fdata(dtype=np.float32))
    nx, ny, nz = canonical.shape[:3]
    if len(images) != nz or sorted(image.frame for image in images) != list(range(nz)):
        raise ValueError(f"write_nifti needs all {nz} slices, got {len(images)}")
    dtype = np.dtype(images[0].original_dtype)
    volume = np.empty((nx * scale, ny * scale, nz), dtype=dtype if dtype.kind in "iuf" else np.float32)
    for image, result in zip(images, results, strict=True):
        if result.shape != (1, ny * scale, nx * scale):
            raise ValueError(f"slice {image.frame}: result shape {result.shape}, expected {(1, ny * scale, nx * scale)}")
        raw = raw_volume[::-1, ::-1, image.frame].T  # the loader's display orientation
        display = final_units(image, result, raw, scale)
        # Display rows run anterior->posterior, columns right->left: undo both flips (loader docstring).
        volume[:, :, image.frame] = cast_units(display.T[::-1, ::-1], volume.dtype.name)
    return volume, canonical, original


def _nifti_bytes(source: Path, volume: np.ndarray, canonical: Any, original: Any, scale: int) -> bytes:
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    to_hr = np.eye(4)
    for axis in (0, 1):
        to_hr[axis, axis] = 1.0 / scale
        to_hr[axis, 3] = (1.0 / scale - 1.0) / 2.0  # HR voxel centres inside the LR voxel
    header = canonical.header.copy()
    header.set_data_dtype(volume.dtype)
    upscaled = type(canonical)(volume, canonical.affine @ to_hr, header)
    upscaled.header.set_slope_inter(1.0, 0.0)
    zooms = list(canonical.header.get_zooms())
    zooms[0], zooms[1] = zooms[0] / scale, zooms[1] / scale
    upscaled.header.set_zooms(zooms[: len(upscaled.shape)] + [1.0] * max(0, len(upscaled.shape) - len(zooms)))
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(original.affine))
    restored = upscaled.as_reoriented(back)
    if len(nib.load(str(source)).shape) == 2:  # a 2-D file stays 2-D (the loader added the slice axis)
        restored = type(restored)(np.asarray(restored.dataobj)[:, :, 0], restored.affine, restored.header)
    data = restored.to_bytes()
    return gzip.compress(data, compresslevel=6) if is_gzip(source) else data


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


# --------------------------------------------------------------------------------------------
# PNG, TIFF, JPEG
# --------------------------------------------------------------------------------------------


RASTER_DTYPES: dict[str, tuple[str, ...]] = {"png": ("uint8", "uint16"), "jpeg": ("uint8",),
                                             "tiff": ("uint8", "uint16", "int16", "int32", "float32")}
"""Sample types each format is written in; a source's own type is kept when its format holds it."""


def write_raster(images: Sequence[MedImage], results: Sequence[np.ndarray], image_format: str,
                 source: Path | None = None, scale: int = 1, png_level: int = 1,
                 timer: PhaseTimer | None = None) -> bytes:
    """PNG/TIFF/JPEG bytes of ``results`` in the sources' sample type (one page per frame for TIFF).

    8-bit sources give 8-bit files, 16-bit give 16-bit (PNG and TIFF), 32-bit integer and float
    TIFFs give the same type back, in their own units (never clipped to 16 bits). JPEG is always
    8-bit (quality 95). ``source`` (and ``scale``) restore values outside a percentile window
    (int32 and float TIFFs); dtype-range windows clip nothing. PNG is encoded by imagecodecs at
    zlib level ``png_level``; measured here on a 1024x1024 16-bit result: level 0 (stored, by
    libspng) 6 ms and 2.1 MB, level 1 (libpng) 85-130 ms and 1.5 MB, Pillow's level 6 135 ms.
    """
    from PIL import Image

    from medsr.data.raster_modes import upright

    image_format = image_format.lower()
    if image_format not in RASTER_MEDIA_TYPES:
        raise WriteError(f"cannot write image format {image_format!r}", "upload PNG, TIFF or JPEG")
    with _phase(timer, "encode"):
        raws: dict[int, np.ndarray] = {}
        if source is not None and any(image.window.method == "percentile" for image in images):
            with Image.open(source) as opened:
                for image in images:
                    opened.seek(image.frame or 0)
                    raws[image.frame or 0] = np.asarray(upright(opened), dtype=np.float64)
        pages = []
        allowed = RASTER_DTYPES[image_format]
        for image, result in zip(images, results, strict=True):
            dtype = image.original_dtype if image.original_dtype in allowed else allowed[-1]
            if dtype == "uint8" and image.original_dtype != "uint8":
                values = result[0].astype(np.float64) * 255.0  # 8-bit output of a deeper image: its window
            elif dtype == image.original_dtype:
                values = final_units(image, result, raws.get(image.frame or 0), scale)
            else:
                values = result[0].astype(np.float64) * 65535.0  # e.g. a float TIFF's window as 16-bit PNG
            pages.append(cast_units(values, dtype))
        if image_format == "png" and len(pages) == 1:
            import imagecodecs

            if int(png_level) == 0:  # stored blocks: libspng writes them ~7x faster than libpng
                return imagecodecs.spng_encode(pages[0], level=0)
            return imagecodecs.png_encode(pages[0], level=int(png_level))
        buffer = io.BytesIO()
        if image_format == "tiff" and pages[0].dtype == np.int16:
            import tifffile  # Pillow writes int16 arrays as 32-bit TIFFs; tifffile keeps 16-bit signed

            tifffile.imwrite(buffer, pages[0] if len(pages) == 1 else np.stack(pages))
            return buffer.getvalue()
        pil_pages = [Image.fromarray(page) for page in pages]
        save_format = {"png": "PNG", "tiff": "TIFF", "jpeg": "JPEG"}[image_format]
        options: dict[str, Any] = {"quality": 95} if image_format == "jpeg" else {}
        if len(pil_pages) > 1 and image_format == "tiff":
            pil_pages[0].save(buffer, format=save_format, save_all=True, append_images=pil_pages[1:])
        else:
            pil_pages[0].save(buffer, format=save_format, **options)
        return buffer.getvalue()
