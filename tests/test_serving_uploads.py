"""serving.uploads and medsr.data.writing on the inputs that used to fail: exact DICOM values, the
moved ImagePositionPatient, big-endian DICOM, 32-bit TIFFs, 4-D NIfTI, DICOM objects without pixels."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsr.data.sample_files import sample_file
from medsr.data.writing import write_dicom
from medsr.inference import Tiling, Upscaler
from medsr.tracking import LoadedGenerator
from medsr.models import build_generator
from serving.errors import INPUT_ERROR_STATUS
from serving.uploads import InputError, read_upload, upscale_file

BIG = 8192 * 8192


class NearestNeighbour(torch.nn.Module):
    """x4 nearest-neighbour upsampling: its output holds exactly the input's values."""

    scale = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, scale_factor=4.0, mode="nearest")


@pytest.fixture(scope="module")
def bicubic_x4() -> LoadedGenerator:
    return LoadedGenerator(module=build_generator("bicubic", 4).eval(), scale=4, architecture="bicubic",
                           registered_name="medsr-x4", version="1", source="test")


def _upscale(path: Path, generator: LoadedGenerator, **kwargs: object):
    upscaler = Upscaler(generator.module, generator.scale, tiling=Tiling(tile=64), device="cpu", score_blur_sigma=0.6)
    return upscale_file(path, generator, upscaler, max_output_pixels=BIG, **kwargs)  # type: ignore[arg-type]


def _mr_dicom(path: Path, pixels: np.ndarray, *, position: list[float], orientation: list[float],
              spacing: list[float], **attributes: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", generate_uid(), generate_uid()
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = position, orientation, spacing
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------ DICOM values


def test_nearest_neighbour_result_gives_the_stored_values_back_exactly(tmp_path: Path) -> None:
    """A result that is a nearest-neighbour upsample of the input must write back exactly the
    input's stored values, 4x4 times each: a writer that truncates instead of rounding loses
    one unit wherever window arithmetic lands just below an integer."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(24, 20)).astype(np.uint16)
    # A window covering every value (in units: 0.7 x stored - 13 spans -13..2853.5), and a
    # rescale slope/intercept to invert on the way back.
    path = _mr_dicom(tmp_path / "mr.dcm", stored, position=[0.0, 0.0, 0.0], orientation=[1, 0, 0, 0, 1, 0],
                     spacing=[1.0, 1.0], WindowCenter=1420, WindowWidth=3200, RescaleSlope=0.7,
                     RescaleIntercept=-13.0)
    _, images, _ = read_upload(path, scale=4, max_output_pixels=BIG)
    result = NearestNeighbour()(torch.from_numpy(images[0].pixels)[None])[0].numpy()
    out = pydicom.dcmread(io.BytesIO(write_dicom(path, images, [result], scale=4, derivation="test")))
    assert out.pixel_array.dtype == np.uint16
    assert np.array_equal(out.pixel_array, np.kron(stored, np.ones((4, 4), np.uint16)))


# -------------------------------------------------------------------------- ImagePositionPatient


def test_image_position_moves_to_the_new_first_pixel_as_the_nifti_origin_does(tmp_path: Path,
                                                                            bicubic_x4: LoadedGenerator) -> None:
    """The same geometry as DICOM (LPS, IPP/IOP/PixelSpacing) and as NIfTI (RAS affine): after
    x4 both must put the first pixel's centre at the same point in the patient."""
    position, row_spacing, column_spacing = [-120.5, 80.25, 33.0], 0.8, 1.3
    orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows run along +x (patient left), columns along +y
    pixels = (np.arange(24 * 20).reshape(24, 20) % 3000).astype(np.uint16)
    dicom_path = _mr_dicom(tmp_path / "plane.dcm", pixels, position=position, orientation=orientation,
                           spacing=[row_spacing, column_spacing])
    out = pydicom.dcmread(io.BytesIO(_upscale(dicom_path, bicubic_x4).content))

    # NIfTI voxel (i, j, 0) = DICOM pixel (row j, column i); LPS -> RAS negates x and y.
    affine = np.array([[-column_spacing, 0, 0, -position[0]], [0, -row_spacing, 0, -position[1]],
                       [0, 0, 2.0, position[2]], [0, 0, 0, 1]])
    nifti_path = tmp_path / "plane.nii"
    nib.save(nib.Nifti1Image(pixels.T[:, :, None].astype(np.int16), affine), nifti_path)
    nifti_out = nib.Nifti1Image.from_bytes(_upscale(nifti_path, bicubic_x4).content)
    ras_origin = nifti_out.affine @ np.array([0.0, 0.0, 0.0, 1.0])
    expected_lps = [-ras_origin[0], -ras_origin[1], ras_origin[2]]

    assert [float(v) for v in out.ImagePositionPatient] == pytest.approx(expected_lps, abs=1e-4)
    shift = (1 / 4 - 1) / 2  # 0.375 LR pixels up and left
    assert float(out.ImagePositionPatient[0]) == pytest.approx(position[0] + shift * column_spacing, abs=1e-4)
    assert float(out.ImagePositionPatient[1]) == pytest.approx(position[1] + shift * row_spacing, abs=1e-4)
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([row_spacing / 4, column_spacing / 4])


def test_per_frame_positions_of_an_enhanced_object_move_too(bicubic_x4: LoadedGenerator) -> None:
    source = sample_file("pydicom-data", "eCT_Supplemental.dcm")
    original = pydicom.dcmread(source, stop_before_pixels=True)
    shared = original.SharedFunctionalGroupsSequence[0]
    cosines = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    before = np.array([float(v) for v in
                       original.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient])
    out = pydicom.dcmread(io.BytesIO(_upscale(source, bicubic_x4, frame=1).content), stop_before_pixels=True)
    after = [float(v) for v in out.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
    expected = before + (1 / 4 - 1) / 2 * (cosines[:3] * column_spacing + cosines[3:] * row_spacing)
    assert after == pytest.approx(list(expected), abs=1e-3)
    assert np.abs(np.array(after) - before).max() > 0.1


# ------------------------------------------------------------------------------ other inputs


def test_big_endian_dicom_comes_back_little_endian(bicubic_x4: LoadedGenerator) -> None:
    source = sample_file("pydicom", "ExplVR_BigEnd.dcm")
    original = pydicom.dcmread(source)
    result = _upscale(source, bicubic_x4)
    out = pydicom.dcmread(io.BytesIO(result.content))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (out.Rows, out.Columns) == (original.Rows * 4, original.Columns * 4)
    # The sample is RGB: the result is its luma, in the source's 8 bits.
    luma = original.pixel_array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    blocks = out.pixel_array.astype(np.float64).reshape(original.Rows, 4, original.Columns, 4).mean(axis=(1, 3))
    assert out.PhotometricInterpretation == "MONOCHROME2" and out.BitsAllocated == 8
    assert np.median(np.abs(blocks - luma)) < 0.02 * 255


@pytest.mark.parametrize(("dtype", "mode"), [(np.int32, "I"), (np.float32, "F")])
def test_32_bit_tiffs_come_back_in_their_own_units(tmp_path: Path, bicubic_x4: LoadedGenerator, dtype: type,
                                                   mode: str) -> None:
    """Values far outside 16 bits (and negative ones) must not be clipped to 0..65535."""
    values = (np.linspace(-50_000, 900_000, 36 * 28).reshape(36, 28)).astype(dtype)
    path = tmp_path / "wide.tif"
    Image.fromarray(values).save(path)
    with Image.open(io.BytesIO(_upscale(path, bicubic_x4).content)) as out:
        assert out.mode == mode and out.size == (28 * 4, 36 * 4)
        result = np.asarray(out).astype(np.float64)
    blocks = result.reshape(36, 4, 28, 4).mean(axis=(1, 3))
    assert np.abs(blocks - values)[2:-2, 2:-2].max() < 0.01 * 950_000
    assert result.max() > 800_000 and result.min() < -40_000


def test_4d_nifti_is_refused_with_how_to_pick_a_volume(tmp_path: Path, bicubic_x4: LoadedGenerator) -> None:
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 10, 3, 5), np.int16), np.eye(4)), path)
    with pytest.raises(InputError) as caught:
        _upscale(path, bicubic_x4)
    assert INPUT_ERROR_STATUS[caught.value.kind] == 422
    assert "4-D" in caught.value.error and "[12, 10, 3, 5]" in caught.value.error and "fslroi" in caught.value.fix


def test_dicom_without_or_with_empty_pixel_data_is_named_so(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8), np.uint16)
    complete = _mr_dicom(tmp_path / "full.dcm", pixels, position=[0, 0, 0], orientation=[1, 0, 0, 0, 1, 0],
                         spacing=[1, 1])
    ds = pydicom.dcmread(complete)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(InputError) as caught:
        read_upload(tmp_path / "nopixels.dcm", scale=4, max_output_pixels=BIG)
    assert INPUT_ERROR_STATUS[caught.value.kind] == 422
    assert "no pixel data" in caught.value.error and "truncated" not in caught.value.error

    ds = pydicom.dcmread(complete)
    ds.PixelData = b""
    ds.save_as(tmp_path / "emptypixels.dcm")
    with pytest.raises(InputError) as caught:
        read_upload(tmp_path / "emptypixels.dcm", scale=4, max_output_pixels=BIG)
    assert INPUT_ERROR_STATUS[caught.value.kind] == 400 and "empty pixel data" in caught.value.error


def test_undecodable_jpeg_does_not_ask_to_install_installed_plugins(tmp_path: Path) -> None:
    source = pydicom.dcmread(sample_file("pydicom", "JPEG-lossy.dcm"))
    source.PixelData = source.PixelData[:len(source.PixelData) // 3] + b"\x00" * 16  # a damaged stream
    path = tmp_path / "damaged_jpeg.dcm"
    source.save_as(path)
    with pytest.raises(InputError) as caught:
        read_upload(path, scale=4, max_output_pixels=BIG)
    assert "pip install" not in caught.value.fix and "installed" in caught.value.fix


# ------------------------------------------------------------------------- /demo is /upscale


def _ramp_png(path: Path, shape: tuple[int, int] = (40, 36)) -> Path:
    """A smooth 16-bit PNG over the whole 0..65535 range (its values map 1:1 to the contract's [0, 1];
    noise-free, so the consistency step runs at full weight)."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    pixels = 0.5 + 0.5 * np.sin(x / 3.0) * np.cos(y / 5.0)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    Image.fromarray(np.rint(pixels * 65535).astype(np.uint16)).save(path)
    return path


def test_the_web_page_shows_the_pixels_and_scores_that_upscale_returns(tmp_path: Path) -> None:
    """The same input and settings through side_by_side (/demo) and upscale_file (/upscale), with the
    consistency step on: the same output pixels and the same consistency score."""
    from medsr.consistency import ConsistencySettings
    from serving.web import side_by_side

    torch.manual_seed(3)
    module = build_generator("espcn", 4).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # off its bicubic start: the step has work to do
    generator = LoadedGenerator(module=module, scale=4, architecture="espcn", registered_name="medsr-x4",
                                version="1", source="test")
    settings = ConsistencySettings(steps=5, noise_threshold=0.005, noise_exponent=8.0)
    upscaler = Upscaler(module, 4, consistency=settings, tiling=Tiling(tile=16), device="cpu", score_blur_sigma=0.6)
    path = _ramp_png(tmp_path / "ramp.png")

    served = upscale_file(path, generator, upscaler, max_output_pixels=BIG)
    _, images, _ = read_upload(path, scale=1, max_output_pixels=BIG)
    page = side_by_side(images[0].pixels, upscaler, noise_kind="none", noise_level=0.0, blur_sigma=0.0,
                        known_original=False, max_side=512)

    with Image.open(io.BytesIO(served.content)) as decoded:
        served_pixels = np.asarray(decoded).astype(np.int64)
    page_pixels = np.rint(page.sr[0].astype(np.float64) * 65535.0).astype(np.int64)
    assert page.sr.shape[1:] == served_pixels.shape
    assert np.abs(page_pixels - served_pixels).max() <= 1  # the codec's rounding, nothing else
    assert page.consistency_psnr == served.consistency_psnr
    raw = upscaler.network(images[0].pixels)
    assert np.abs(raw - page.sr).max() > 1e-3  # the step changed the network's output, and both paths applied it


@pytest.mark.parametrize(("code", "upload_modality", "evaluate_modality"),
                         [("PT", "ct", "ct"), ("MR", "mri", "mri"), ("DX", "xray", "xray"), ("OT", "xray", None)])
def test_one_dicom_modality_table_for_uploads_and_evaluate(tmp_path: Path, code: str, upload_modality: str,
                                                           evaluate_modality: str | None) -> None:
    """/upscale and `medsr evaluate` read the DICOM Modality through the same table; a code it does
    not list is X-ray-like for an upload, and `medsr evaluate` asks for --modality."""
    from medsr.evaluation import guess_modality

    path = _mr_dicom(tmp_path / "slice.dcm", np.full((16, 16), 300, np.uint16), position=[0.0, 0.0, 0.0],
                     orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], spacing=[1.0, 1.0], Modality=code)
    assert read_upload(path, scale=4, max_output_pixels=BIG)[2] == upload_modality
    if evaluate_modality is None:
        with pytest.raises(ValueError, match="--modality"):
            guess_modality(path, None)
    else:
        assert guess_modality(path, None) == evaluate_modality


def test_one_frame_of_a_long_cine_is_upscaled_within_the_size_limit(bicubic_x4: LoadedGenerator) -> None:
    """A 120-frame colour ultrasound at x4 (120 x 1920 x 2560 output pixels, 9x the limit) with one
    `frame` asked for: that frame is decoded, checked against the limit and upscaled; with no
    `frame` the answer says how many frames there are, not that the file is too large."""
    path = sample_file("pydicom-data", "color3d_jpeg_baseline.dcm")
    limit = 8192 * 8192  # serving.max_output_pixels
    upscaler = Upscaler(bicubic_x4.module, 4, tiling=Tiling(tile=128), device="cpu", score_blur_sigma=0.6)
    result = upscale_file(path, bicubic_x4, upscaler, max_output_pixels=limit, frame=57)
    assert (result.frames, result.input_size, result.output_size) == (1, (480, 640), (1920, 2560))
    with pytest.raises(InputError) as caught:
        upscale_file(path, bicubic_x4, upscaler, max_output_pixels=limit)
    assert INPUT_ERROR_STATUS[caught.value.kind] == 422 and "120 frames" in caught.value.error
    with pytest.raises(InputError) as caught:
        upscale_file(path, bicubic_x4, upscaler, max_output_pixels=limit, frame=120)
    assert INPUT_ERROR_STATUS[caught.value.kind] == 422 and "0 and 119" in caught.value.fix
