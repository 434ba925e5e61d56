"""medsr.inference, serving.uploads and medsr.data.writing: exact tiling for every architecture, the
consistency operator, reading uploads, writing formats back."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut

from medsr.data.loading import load_dicom
from medsr.data.sample_files import sample_file
from medsr.degradations import degrade_bicubic, degrade_standard, gaussian_blur
from medsr.consistency import consistency_psnr
from medsr.inference import (
    PhaseTimer,
    Tiling,
    Upscaler,
    choose_memory_format,
    forward,
    receptive_radius,
    tile_windows,
    upscale_image,
)
from medsr.models import build_generator
from medsr.tracking import LoadedGenerator
from serving.errors import INPUT_ERROR_STATUS
from serving.uploads import InputError, read_upload, select_frame, sniff_format, upscale_file

BIG = 8192 * 8192


@pytest.fixture(scope="module")
def espcn() -> LoadedGenerator:
    """An ESPCN x4 with weights moved off its bicubic-like start, so tiling errors would show."""
    torch.manual_seed(0)
    module = build_generator("espcn", 4).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return LoadedGenerator(module=module, scale=4, architecture="espcn", registered_name="medsr-x4", version="7",
                           source="test")


@pytest.fixture(scope="module")
def bicubic_x4() -> LoadedGenerator:
    return LoadedGenerator(module=build_generator("bicubic", 4).eval(), scale=4, architecture="bicubic",
                           registered_name="medsr-x4", version="1", source="test")


def _upscale(path: Path, generator: LoadedGenerator, **kwargs: object):
    upscaler = Upscaler(generator.module, generator.scale, tiling=Tiling(tile=64), device="cpu", score_blur_sigma=0.6)
    return upscale_file(path, generator, upscaler, max_output_pixels=kwargs.pop("max_output_pixels", BIG),  # type: ignore[arg-type]
                        **kwargs)  # type: ignore[arg-type]


def status(err: InputError) -> int:
    return INPUT_ERROR_STATUS[err.kind]


# ------------------------------------------------------------------------------------- tiling


def test_tile_windows_partition_the_image() -> None:
    assert tile_windows(100, 128, 16) == [(0, 0, 100)]
    windows = tile_windows(300, 64, 10)
    assert [(core_start, core_end) for _, core_start, core_end in windows] == [(0, 64), (64, 128), (128, 192),
                                                                              (192, 256), (256, 300)]
    for start, core_start, core_end in windows:
        assert 0 <= start and start + 84 <= 300  # one window size: 64 + 2 x 10
        assert core_start - start >= 10 or start == 0
        assert start + 84 - core_end >= 10 or start + 84 == 300


# Small variants of every generator (the structure, not the width, decides the receptive field);
# weights moved off their near-identity start so that context outside a tile would show.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "espcn": {}, "srgan": {"n_blocks": 3, "n_feats": 16}, "swift_srgan": {"n_blocks": 3, "n_feats": 16},
    "brainsr": {"n_blocks": 3, "n_feats": 16}, "blimsr": {"n_groups": 2, "n_blocks": 2, "n_feats": 16},
    "residual_cnn": {"n_feats": 16},
}


def _perturbed(architecture: str, scale: int = 4, strength: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    module = build_generator(architecture, scale, **ARCHITECTURES[architecture]).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * strength)
        for buffer_name, buffer in module.named_buffers():  # BatchNorm statistics, used in eval mode
            if buffer_name.endswith("running_mean"):
                buffer.add_(torch.randn_like(buffer) * 0.1)
    return module


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_tiled_equals_whole_image_for_every_architecture(architecture: str) -> None:
    # Perturbed enough to make every weight matter, not so much that the output saturates: at 0.3,
    # 93-100% of the pixels sat at 0 or 1, which hides a short margin there, and BliMSR's few
    # pixels on the edge flipped 0 <-> 1 on a rounding difference (AVX2 vs AVX-512 kernels).
    module = _perturbed(architecture, strength=0.05)
    radius = receptive_radius(module)
    tile = 12
    # Several tiles along both axes, odd sizes, a last tile shorter than the others.
    shape = (1, 2 * tile + 2 * radius + 5, 3 * tile + 2 * radius + 3)
    image = (np.random.default_rng(1).random(shape, dtype=np.float32) * 0.6 + 0.2).astype(np.float32)
    whole = forward(module, image[None])[0]
    timer = PhaseTimer()
    tiled = upscale_image(module, image, 4, tiling=Tiling(tile=tile, batch_size=3), timer=timer)
    assert len(tile_windows(shape[1], tile, radius)) >= 2 and len(tile_windows(shape[2], tile, radius)) >= 3
    assert tiled.shape == whole.shape and tiled.dtype == np.float32
    assert float(np.abs(tiled - whole).max()) <= 1e-5
    assert {"window", "forward"} <= set(timer.seconds)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_channels_last_path_matches_eager(architecture: str) -> None:
    """The layout the service may pick (choose_memory_format) computes the same output (up to
    float rounding in another summation order: weights perturbed less than above, where
    saturated activations amplify rounding)."""
    module = _perturbed(architecture, strength=0.05)
    image = np.random.default_rng(5).random((2, 1, 40, 36), dtype=np.float32)
    eager = forward(module, image)
    module.to(memory_format=torch.channels_last)
    assert np.abs(forward(module, image) - eager).max() <= 1e-5
    assert choose_memory_format(module, probe=24, repeats=1) in ("channels_last", "contiguous")
    assert np.abs(forward(module, image) - eager).max() <= 1e-5


def test_receptive_radius_is_the_layers_reach() -> None:
    # ESPCN: a 5x5 and three 3x3 convs in LR space (2 + 3 x 1) plus the bicubic skip's 2.
    assert receptive_radius(build_generator("espcn", 4)) == 7
    # The residual CNN: bicubic (2 LR px), then five 3x3 convs at x2 (5 HR px = 2.5 LR px).
    assert receptive_radius(build_generator("residual_cnn", 2)) == 5


def test_too_small_a_margin_shows_seams() -> None:
    """Control for the test above: tiles cut with less context than the radius do differ."""
    module = _perturbed("espcn")
    image = np.random.default_rng(2).random((1, 96, 96), dtype=np.float32)
    whole = forward(module, image[None])[0]
    seamed = upscale_image(module, image, 4, tiling=Tiling(tile=32, margin=receptive_radius(module) - 3))
    assert np.abs(seamed - whole).max() > 1e-3


def test_invalid_tiling_names_the_params() -> None:
    with pytest.raises(ValueError, match="serving.tile"):
        Tiling(tile=4)


# -------------------------------------------------------------------------------- consistency


def test_consistency_high_for_faithful_output_low_for_hallucination() -> None:
    rng = np.random.default_rng(3)
    hr = gaussian_blur(rng.random((1, 128, 128), dtype=np.float32), 2.0)
    lr = degrade_bicubic(gaussian_blur(hr, 0.6), 4)
    faithful = consistency_psnr(hr, lr, 4, 0.6)
    hallucinated = hr.copy()
    hallucinated[:, 40:90, 40:90] = 1.0  # a bright structure the input does not hold
    assert faithful > 40.0
    assert consistency_psnr(hallucinated, lr, 4, 0.6) < faithful - 15.0
    with pytest.raises(ValueError, match="not 4 x LR"):
        consistency_psnr(hr[:, :64], lr, 4, 0.6)


def test_consistency_operator_is_the_training_degradation_exactly() -> None:
    """The score re-degrades with exactly the operator the pairs were made with (minus noise):
    an HR image against its own noise-free LR scores the cap. Dropping the blur, or using any
    other downsampling, lowers it far below."""
    from medsr.metrics import PSNR_CAP_DB

    rng = np.random.default_rng(4)
    hr = gaussian_blur(rng.random((1, 96, 80), dtype=np.float32), 1.0)
    for scale, sigma in ((4, 0.6), (2, 1.1)):
        lr = degrade_standard(hr, scale, blur_sigma=sigma, noise_kind="gaussian", noise_level=0.0,
                              rng=np.random.default_rng(0))
        assert consistency_psnr(hr, lr, scale, sigma) == PSNR_CAP_DB
        unblurred = degrade_bicubic(hr, scale)
        assert consistency_psnr(hr, unblurred, scale, sigma) < 60.0


# ------------------------------------------------------------------------------------ reading


def test_sniff_format_by_content() -> None:
    assert sniff_format(b"\x00" * 128 + b"DICM") == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"II*\x00") == "tiff"
    assert sniff_format(b"\x1f\x8b\x08") == "nifti-gz"
    assert sniff_format(b"hello") is None
    assert sniff_format(b"hello", "scan.dcm") == "dicom"


def test_read_upload_errors_are_classified_and_hold_no_file_name(tmp_path: Path) -> None:
    secret = tmp_path / "Jane_Doe_1234.dcm"
    secret.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    with pytest.raises(InputError) as caught:
        read_upload(secret, scale=4, max_output_pixels=BIG)
    assert status(caught.value) == 400 and "Jane" not in str(caught.value)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError) as caught:
        read_upload(text, scale=4, max_output_pixels=BIG)
    assert status(caught.value) == 415

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError) as caught:
        read_upload(empty, scale=4, max_output_pixels=BIG)
    assert status(caught.value) == 400 and "empty" in caught.value.error

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 500), np.uint8)).save(big)
    with pytest.raises(InputError) as caught:
        read_upload(big, scale=4, max_output_pixels=600 * 500 * 16 - 1)
    assert status(caught.value) == 413 and "serving.max_output_pixels" in caught.value.error

    nan = tmp_path / "nan.tif"
    values = np.ones((32, 32), np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values, mode="F").save(nan)
    with pytest.raises(InputError) as caught:
        read_upload(nan, scale=4, max_output_pixels=BIG)
    assert status(caught.value) == 422 and "NaN" in caught.value.fix


def test_multi_frame_needs_a_frame() -> None:
    path = sample_file("pydicom-data", "emri_small.dcm")
    file_format, images, modality = read_upload(path, scale=4, max_output_pixels=BIG)
    assert (file_format, len(images), modality) == ("dicom", 10, "mri")
    with pytest.raises(InputError) as caught:
        select_frame(images, file_format, None)
    assert status(caught.value) == 422 and "10 frames" in caught.value.error and "frame" in caught.value.fix
    with pytest.raises(InputError):
        select_frame(images, file_format, 10)
    assert select_frame(images, file_format, 3)[0].frame == 3


# ------------------------------------------------------------------------------------ writing


def test_dicom_ct_round_trip_keeps_hounsfield_units(espcn: LoadedGenerator) -> None:
    source = sample_file("pydicom", "CT_small.dcm")
    original = pydicom.dcmread(source)
    result = _upscale(source, espcn)
    out = pydicom.dcmread(io.BytesIO(result.content))

    assert (out.Rows, out.Columns) == (original.Rows * 4, original.Columns * 4)
    assert out.SOPInstanceUID != original.SOPInstanceUID
    assert out.SeriesInstanceUID != original.SeriesInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.StudyInstanceUID == original.StudyInstanceUID
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "espcn" in out.DerivationDescription and "medsr-x4 version 7" in out.DerivationDescription
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 4 for v in original.PixelSpacing], rel=1e-5)
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert out.pixel_array.dtype == original.pixel_array.dtype
    assert (out.RescaleSlope, out.RescaleIntercept) == (original.RescaleSlope, original.RescaleIntercept)

    # Back in HU: the 4x4 block means of the output match the input, outside the window too.
    window = load_dicom(source, "ct")[0].window
    hu_in = apply_modality_lut(original.pixel_array, original).astype(np.float64)
    hu_out = apply_modality_lut(out.pixel_array, out).astype(np.float64)
    blocks = hu_out.reshape(original.Rows, 4, original.Columns, 4).mean(axis=(1, 3))
    assert np.median(np.abs(blocks - hu_in)) < 0.03 * (window.high - window.low)
    assert hu_in.max() > window.high and hu_out.max() > window.high  # bright bone is not clipped
    assert result.consistency_psnr > 20.0


def test_dicom_frame_of_enhanced_multiframe(bicubic_x4: LoadedGenerator) -> None:
    source = sample_file("pydicom-data", "eCT_Supplemental.dcm")
    original = pydicom.dcmread(source, stop_before_pixels=True)
    out = pydicom.dcmread(io.BytesIO(_upscale(source, bicubic_x4, frame=1).content))
    assert (out.Rows, out.Columns, int(out.NumberOfFrames)) == (2048, 2048, 1)
    assert len(out.PerFrameFunctionalGroupsSequence) == 1
    assert out.SourceImageSequence[0].ReferencedFrameNumber == 2
    shared, shared_in = out.SharedFunctionalGroupsSequence[0], original.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) / 4 for v in shared_in.PixelMeasuresSequence[0].PixelSpacing], rel=1e-5)
    assert shared.CTImageFrameTypeSequence[0].FrameType[0] == "DERIVED"


def _volume(tmp_path: Path, name: str, affine: np.ndarray) -> tuple[Path, np.ndarray]:
    data = np.zeros((20, 16, 3), np.int16)
    data[4:15, 3:12, :] = 400
    data[8:11, 5:8, 1] = 900
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path, data


def test_nifti_every_slice_affine_and_zooms(tmp_path: Path, bicubic_x4: LoadedGenerator) -> None:
    # Left-to-right flipped x axis (LAS) with anisotropic voxels: the orientation must survive.
    affine = np.array([[-2.0, 0, 0, 40], [0, 1.5, 0, -20], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    path, data = _volume(tmp_path, "volume.nii.gz", affine)
    result = _upscale(path, bicubic_x4)
    assert result.frames == 3 and result.filename.endswith(".nii.gz")
    out = nib.Nifti1Image.from_bytes(gzip.decompress(result.content))
    assert out.shape == (80, 64, 3)
    assert out.get_data_dtype() == np.int16
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    assert out.header.get_zooms() == pytest.approx((0.5, 0.375, 3.0))
    # Same field of view: the centre of LR voxel (i, j, k) is the centre of its 4x4 HR block.
    lr_centre = affine @ np.array([5, 7, 1, 1.0])
    hr_centre = out.affine @ np.array([5 * 4 + 1.5, 7 * 4 + 1.5, 1, 1.0])
    assert hr_centre[:3] == pytest.approx(lr_centre[:3])
    values = np.asarray(out.dataobj)
    blocks = values.reshape(20, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(blocks - data)[2:-2, 2:-2].max() < 120  # bicubic smooths the edges only
    assert values[10 * 4, 6 * 4, 1] > 700  # the bright spot stays in slice 1, at the same place


def test_nifti_frame_argument_is_refused(tmp_path: Path, bicubic_x4: LoadedGenerator) -> None:
    path, _ = _volume(tmp_path, "volume.nii", np.eye(4))
    with pytest.raises(InputError, match="NIfTI"):
        _upscale(path, bicubic_x4, frame=0)


@pytest.mark.parametrize(("name", "array", "mode"), [
    ("gray8.png", np.linspace(0, 255, 40 * 30).reshape(40, 30).astype(np.uint8), "L"),
    ("gray16.png", np.linspace(0, 65535, 40 * 30).reshape(40, 30).astype(np.uint16), "I;16"),
    ("gray16.tif", np.linspace(0, 40000, 40 * 30).reshape(40, 30).astype(np.uint16), "I;16"),
    ("photo.jpg", np.linspace(0, 255, 40 * 30).reshape(40, 30).astype(np.uint8), "L"),
])
def test_raster_formats_keep_format_and_depth(tmp_path: Path, bicubic_x4: LoadedGenerator, name: str,
                                             array: np.ndarray, mode: str) -> None:
    path = tmp_path / name
    Image.fromarray(array).save(path)
    result = _upscale(path, bicubic_x4)
    with Image.open(io.BytesIO(result.content)) as out:
        assert out.format == Image.open(path).format
        assert out.mode == mode and out.size == (30 * 4, 40 * 4)
        values = np.asarray(out).astype(np.float64)
    blocks = values.reshape(40, 4, 30, 4).mean(axis=(1, 3))
    tolerance = 0.03 * float(np.iinfo(array.dtype).max)
    assert np.abs(blocks - array)[2:-2, 2:-2].max() < tolerance
