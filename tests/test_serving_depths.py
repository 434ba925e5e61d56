"""Inputs that came back as a 500 or a wrong success (issue 22), through serving.uploads in-process:
32-bit and float DICOM, PALETTE COLOR with 16-bit LUT entries, 16-bit colour and grey+alpha PNG,
signed 16-bit TIFF, 2-D NIfTI, EXIF orientation, and the `converted` note behind X-MedSR-Converted."""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsr.data.sample_files import sample_file
from medsr.inference import Tiling, Upscaler
from medsr.tracking import LoadedGenerator
from medsr.models import build_generator
from serving.uploads import FileResult, upscale_file

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def bicubic_x2() -> LoadedGenerator:
    return LoadedGenerator(module=build_generator("bicubic", 2).eval(), scale=2, architecture="bicubic",
                           registered_name="medsr-x2", version="1", source="test")


def _upscale(path: Path, generator: LoadedGenerator, **kwargs: object) -> FileResult:
    upscaler = Upscaler(generator.module, generator.scale, tiling=Tiling(tile=64), device="cpu", score_blur_sigma=0.6)
    return upscale_file(path, generator, upscaler, max_output_pixels=1 << 26, **kwargs)  # type: ignore[arg-type]


def _blocks(result: np.ndarray, scale: int = 2) -> np.ndarray:
    height, width = result.shape[0] // scale, result.shape[1] // scale
    return result.astype(np.float64).reshape(height, scale, width, scale).mean(axis=(1, 3))


def smooth(shape: tuple[int, int], low: float, high: float) -> np.ndarray:
    """A smooth ramp (bicubic gives it back nearly exactly, unlike noise)."""
    rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    return low + (high - low) * (0.6 * rows + 0.4 * cols)


def dicom_with(path: Path, stored: np.ndarray, photometric: str, keyword: str = "PixelData", **attributes: object) -> Path:
    """A DICOM holding ``stored`` as is (pydicom's set_pixel_data refuses 32-bit and float)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", generate_uid(), generate_uid()
    colour = stored.ndim == 3
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = stored.dtype.itemsize * 8
    if keyword == "PixelData":
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = ds.BitsAllocated, ds.BitsAllocated - 1, int(stored.dtype.kind == "i")
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    else:
        setattr(ds, keyword, stored.tobytes())
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(("dtype", "low", "high"), [("<i4", -2.0e9, 2.0e9), ("<u4", 1.0e6, 4.0e9)])
def test_32_bit_dicom_keeps_its_depth(tmp_path: Path, bicubic_x2: LoadedGenerator, dtype: str, low: float,
                                      high: float) -> None:
    stored = smooth((24, 20), low, high).astype(dtype)
    out = pydicom.dcmread(io.BytesIO(_upscale(dicom_with(tmp_path / "deep.dcm", stored, "MONOCHROME2"), bicubic_x2).content))
    assert out.BitsAllocated == 32 and out.BitsStored == 32 and out.pixel_array.dtype == np.dtype(dtype).newbyteorder("=")
    assert np.abs(_blocks(out.pixel_array) - stored)[2:-2, 2:-2].max() < 0.01 * (high - low)


def test_float_dicom_comes_back_as_float_pixel_data(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    stored = smooth((16, 16), -3.5, 700.25).astype("<f4")
    path = dicom_with(tmp_path / "float.dcm", stored, "MONOCHROME2", keyword="FloatPixelData")
    out = pydicom.dcmread(io.BytesIO(_upscale(path, bicubic_x2).content))
    assert "FloatPixelData" in out and "PixelData" not in out and out.pixel_array.dtype == np.float32
    assert np.abs(_blocks(out.pixel_array) - stored)[2:-2, 2:-2].max() < 0.01 * 700


def test_32_bit_rgb_dicom_becomes_32_bit_luma(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    grey = smooth((16, 16), 1.0e6, 3.0e9)
    stored = np.stack([grey, grey * 0.9, grey * 1.1], axis=-1).clip(0, 2**32 - 1).astype("<u4")
    result = _upscale(dicom_with(tmp_path / "rgb32.dcm", stored, "RGB"), bicubic_x2)
    out = pydicom.dcmread(io.BytesIO(result.content))
    assert result.converted == "rgb->luma" and out.PhotometricInterpretation == "MONOCHROME2"
    assert out.BitsStored == 32 and out.pixel_array.dtype == np.uint32
    assert np.abs(_blocks(out.pixel_array) - stored @ LUMA)[2:-2, 2:-2].max() < 0.01 * 3.0e9


def test_rt_dose_frame_keeps_32_bits(bicubic_x2: LoadedGenerator) -> None:
    source = pydicom.dcmread(sample_file("pydicom", "rtdose.dcm"))
    out = pydicom.dcmread(io.BytesIO(_upscale(Path(sample_file("pydicom", "rtdose.dcm")), bicubic_x2, frame=1).content))
    assert source.BitsAllocated == 32 and out.BitsAllocated == 32 and out.pixel_array.dtype == np.uint32
    assert out.pixel_array.shape == (source.Rows * 2, source.Columns * 2)


def test_palette_colour_with_16_bit_lut_is_not_saturated(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    """8-bit indices into 16-bit LUT entries: the luma lies on a 0..65535 scale and must be written so."""
    from pydicom.uid import SecondaryCaptureImageStorage

    indices = smooth((24, 24), 0, 255).astype(np.uint8)
    ramp = np.linspace(0, 65535, 256).astype("<u2")
    path = dicom_with(tmp_path / "palette.dcm", indices, "PALETTE COLOR",
                      RedPaletteColorLookupTableDescriptor=[256, 0, 16], GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
                      BluePaletteColorLookupTableDescriptor=[256, 0, 16], RedPaletteColorLookupTableData=ramp.tobytes(),
                      GreenPaletteColorLookupTableData=(ramp // 2).tobytes(), BluePaletteColorLookupTableData=ramp[::-1].tobytes(),
                      SOPClassUID=SecondaryCaptureImageStorage)
    result = _upscale(path, bicubic_x2)
    out = pydicom.dcmread(io.BytesIO(result.content)).pixel_array
    expected = np.stack([ramp[indices], ramp[indices] // 2, ramp[::-1][indices]], axis=-1).astype(np.float64) @ LUMA
    assert result.converted == "palette->luma" and out.dtype == np.uint16
    assert np.mean(out >= out.max()) < 0.05, "saturated"
    assert np.abs(_blocks(out) - expected)[2:-2, 2:-2].max() < 0.01 * 65535


@pytest.mark.parametrize(("channels", "label"), [(3, "rgb->luma"), (2, "la->luma"), (4, "rgba->luma")])
def test_16_bit_colour_and_alpha_png_keep_16_bits(tmp_path: Path, bicubic_x2: LoadedGenerator, channels: int,
                                                  label: str) -> None:
    grey = smooth((20, 24), 300, 65000)
    planes = [grey, grey * 0.5, grey[::-1] * 0.8, np.full_like(grey, 65535)][:channels]
    if channels == 2:
        planes = [grey, np.full_like(grey, 40000)]
    samples = np.stack(planes, axis=-1).astype(np.uint16)
    path = tmp_path / "colour16.png"
    path.write_bytes(imagecodecs.png_encode(samples))
    result = _upscale(path, bicubic_x2)
    out = np.asarray(imagecodecs.png_decode(result.content))
    expected = grey if channels == 2 else samples[..., :3].astype(np.float64) @ LUMA
    assert result.converted == label and out.dtype == np.uint16 and out.ndim == 2
    assert np.abs(_blocks(out) - expected)[2:-2, 2:-2].max() < 0.005 * 65535  # 8 bits would be off by ~256


def test_signed_16_bit_tiff_stays_int16(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    stored = smooth((20, 16), -1000, 3000).astype(np.int16)
    path = tmp_path / "ct.tif"
    tifffile.imwrite(path, stored)
    out = tifffile.imread(io.BytesIO(_upscale(path, bicubic_x2).content))
    assert out.dtype == np.int16 and out.shape == (40, 32) and out.min() < -900
    assert np.abs(_blocks(out) - stored)[2:-2, 2:-2].max() < 0.01 * 4000


def test_2d_nifti_stays_2d(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    path = tmp_path / "plane.nii.gz"
    nib.save(nib.Nifti1Image(smooth((12, 10), 0, 900).astype(np.int16), np.diag([0.8, 0.6, 1.0, 1.0])), path)
    out = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(_upscale(path, bicubic_x2).content))
    assert out.shape == (24, 20) and out.header.get_zooms() == pytest.approx((0.4, 0.3))


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    """Stored 32 wide x 16 high, bright on the left, with orientation 6 (turn 90 degrees clockwise
    to view): viewers show 16 wide x 32 high, bright at the top."""
    stored = np.full((16, 32), 30, np.uint8)
    stored[:, :16] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    shown = np.asarray(__import__("PIL.ImageOps", fromlist=["x"]).exif_transpose(Image.open(path)))
    with Image.open(io.BytesIO(_upscale(path, bicubic_x2).content)) as out:
        result = np.asarray(out)
    assert shown.shape == (32, 16) and result.shape == (64, 32)
    assert result[:24].mean() > 180 and result[40:].mean() < 80


def test_rgb_png_says_it_was_converted(tmp_path: Path, bicubic_x2: LoadedGenerator) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(grey)
    assert _upscale(path, bicubic_x2).converted == "rgb->luma" and _upscale(grey, bicubic_x2).converted is None
