"""Loading real medical files into contract images: windows, orientation, frames and bad input.

Every sample is a real file shipped by an installed package (pydicom, pydicom-data, nilearn,
nibabel), found with ``sample_file``; damaged or unusual variants are made from them in tmp_path.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medsr.data import check_contract
from medsr.data import loading as L
from medsr.data.loading import LoadError, load_dicom, load_image, load_nifti, load_raster, patient_key
from medsr.data.sample_files import sample_file

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def pydicom_file(name: str) -> Path:
    return sample_file("pydicom", name)


def store_file(name: str) -> Path:
    return sample_file("pydicom-data", name)


def only(images: list) -> object:
    assert len(images) == 1
    return images[0]


def assert_contract(images: list) -> None:
    for image in images:
        check_contract(image.pixels, image.source)


# ------------------------------------------------------------------------------------- DICOM


def test_ct_small_round_trips_to_hounsfield_units() -> None:
    path = pydicom_file("CT_small.dcm")
    image = only(load_image(path, "ct"))
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)

    # No window in the file: robust percentiles of the HU values.
    low, high = np.percentile(hu, [0.5, 99.5])
    assert (image.window.method, image.window.low, image.window.high) == ("percentile", low, high)
    assert not image.window.inverted
    back = image.window.to_units(image.pixels[0])
    inside = (hu >= low) & (hu <= high)
    assert inside.mean() > 0.98
    np.testing.assert_allclose(back[inside], hu[inside], atol=1e-4 * (high - low))
    # Clipping agrees with the window: below low is 0, above high is 1.
    assert np.all(image.pixels[0][hu < low] == 0.0) and np.all(image.pixels[0][hu > high] == 1.0)
    assert image.original_dtype == "int16"
    assert image.spacing == pytest.approx((0.661468, 0.661468))
    assert image.frame is None
    assert (image.extra["raw_min"], image.extra["raw_max"]) == (hu.min(), hu.max())
    assert_contract([image])


def test_dicom_window_uses_pydicom_window_semantics() -> None:
    path = pydicom_file("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600, signed 16-bit
    image = only(load_image(path, "mri"))
    ds = pydicom.dcmread(path)
    assert image.window.method == "dicom_window"
    # pydicom maps the window onto the stored range [-32768, 32767]; rescale that to [0, 1].
    expected = (apply_voi_lut(ds.pixel_array, ds) + 32768.0) / 65535.0
    np.testing.assert_allclose(image.pixels[0], expected, atol=1e-6)
    assert (image.window.low, image.window.high) == (600 - 0.5 - 799.5, 600 - 0.5 + 799.5)


def test_monochrome1_chest_radiograph_is_inverted() -> None:
    path = store_file("RG1_UNCI.dcm")  # CR chest, MONOCHROME1, 1955x1841, WindowCenter 15000
    image = only(load_image(path, "xray"))
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert image.pixels.shape == (1, 1955, 1841)
    assert image.window.inverted and image.window.method == "dicom_window"
    pixels = image.pixels[0]
    # MONOCHROME1: a high stored value is dark, so it must come out near 0 (1.0 = white = dense).
    assert pixels.flat[raw.argmax()] < 0.2 < 0.8 < pixels.flat[raw.argmin()]
    assert np.corrcoef(raw.ravel()[::97], pixels.ravel()[::97])[0, 1] < -0.99
    inside = (raw >= image.window.low) & (raw <= image.window.high)
    np.testing.assert_allclose(image.window.to_units(pixels)[inside], raw[inside], atol=0.01)
    assert image.original_dtype == "uint16"
    assert image.spacing is None  # the file's PixelSpacing is 0\0: unknown, not zero-sized
    assert_contract([image])


def test_voi_lut_sequence_matches_pydicom() -> None:
    path = store_file("vlut_04.dcm")  # a VOI LUT Sequence, 8-bit stored, 16-bit LUT
    image = only(load_image(path, "xray"))
    ds = pydicom.dcmread(path)
    assert image.window.method == "voi_lut"
    assert "voi_lut_nonlinear" not in image.extra
    np.testing.assert_allclose(image.pixels[0], apply_voi_lut(ds.pixel_array, ds) / 65535.0, atol=1e-6)


def test_enhanced_multiframe_ct_uses_functional_groups() -> None:
    path = store_file("eCT_Supplemental.dcm")  # 2 frames 512x512, rescale and window per frame group
    images = load_image(path, "ct")
    assert [image.frame for image in images] == [0, 1]
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    for image in images:
        assert image.pixels.shape == (1, 512, 512)
        # Frame VOI LUT: centre 49, width 102 (HU, after the -1024 intercept of the group).
        assert (image.window.method, image.window.low, image.window.high) == ("dicom_window", -2.0, 99.0)
        assert image.spacing == pytest.approx((0.388672, 0.388672))
        hu = stored[image.frame] - 1024.0
        inside = (hu >= -2.0) & (hu <= 99.0)
        assert inside.any()
        np.testing.assert_allclose(image.window.to_units(image.pixels[0])[inside], hu[inside], atol=1e-3)
    assert_contract(images)


def test_multiframe_mri_splits_frames_with_one_window() -> None:
    path = store_file("emri_small.dcm")  # 10 frames of 64x64
    images = load_image(path, "mri")
    assert [image.frame for image in images] == list(range(10))
    assert len({image.window for image in images}) == 1
    assert len({image.patient_key for image in images}) == 1
    assert_contract(images)
    assert [image.frame for image in load_image(path, "mri", slice_step=3)] == [0, 3, 6, 9]


@pytest.mark.parametrize("compressed",
                         ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_compressed_dicom_matches_uncompressed_twin(compressed: str) -> None:
    plain = only(load_image(pydicom_file("MR_small.dcm"), "mri"))
    packed = only(load_image(pydicom_file(compressed), "mri"))
    assert packed.extra["transfer_syntax"] != plain.extra["transfer_syntax"]
    np.testing.assert_array_equal(packed.pixels, plain.pixels)
    assert packed.window == plain.window


def test_lossy_jpeg2000_and_colour_dicom_load() -> None:
    nm = only(load_image(pydicom_file("JPEG2000.dcm"), "ct"))
    assert nm.pixels.shape == (1, 1024, 256) and nm.extra["transfer_syntax"] == "JPEG 2000 Image Compression"
    rgb = only(load_image(pydicom_file("SC_rgb_jpeg.dcm"), "xray"))  # JPEG baseline, RGB
    assert rgb.window.method == "dtype_range" and "grayscale" in rgb.extra["converted"]
    assert_contract([nm, rgb])


def test_undecodable_stream_names_syntax_and_plugin() -> None:
    path = pydicom_file("JPEG-lossy.dcm")  # 12-bit JPEG Extended that the installed plugins reject
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct")
    assert caught.value.reason == L.REASON_UNDECODABLE
    assert "JPEG Extended" in str(caught.value) and "pip install pylibjpeg" in caught.value.fix


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.99999.7"
    path = tmp_path / "unknown_syntax.dcm"
    ds.save_as(path)
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct")
    assert caught.value.reason == L.REASON_UNSUPPORTED_SYNTAX
    assert "1.2.826.0.1.3680043.99999.7" in str(caught.value) and str(path) in str(caught.value)
    assert "pip install" in caught.value.fix


def test_constant_dicom_is_zeros_not_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.PixelData = np.full((128, 128), 100, dtype=np.int16).tobytes()
    path = tmp_path / "constant.dcm"
    ds.save_as(path)
    image = only(load_image(path, "ct"))
    assert np.all(image.pixels == 0.0)
    assert image.window.low == image.window.high == 100 - 1024
    assert image.extra["raw_min"] == image.extra["raw_max"] == -924.0
    np.testing.assert_array_equal(image.window.to_units(image.pixels), -924.0)


def test_patient_key_never_shows_patient_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    secret = "0123abcd"  # hex-like, so it could hide inside a hex digest if the key leaked it
    ds.PatientID = secret
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    with caplog.at_level(logging.DEBUG, logger="medsr"):
        image = only(load_image(path, "ct", root=tmp_path))
    assert image.patient_key == patient_key(secret)
    assert secret not in image.patient_key and image.patient_key != secret
    assert len(image.patient_key) == 16 and int(image.patient_key, 16) >= 0
    assert secret not in caplog.text and secret not in repr(image.extra)
    assert patient_key(secret, salt="other") != image.patient_key

    # Identity falls back to the study, then to the file.
    del ds.PatientID
    ds.save_as(path)
    assert only(load_image(path, "ct")).patient_key == patient_key(ds.StudyInstanceUID)
    del ds.StudyInstanceUID
    ds.save_as(path)
    assert only(load_image(path, "ct", root=tmp_path)).patient_key == patient_key("ct.dcm")

    # Errors carry no identity either.
    ds.PatientID = secret
    ds.save_as(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct")
    assert secret not in str(caught.value)


# ------------------------------------------------------------------------------------- NIfTI


@pytest.fixture(scope="module")
def mni_images() -> list:
    return load_image(sample_file("nilearn", MNI_T1), "mri")


def test_mni_volume_contract_and_window(mni_images: list) -> None:
    assert len(mni_images) == 189  # 197 x 233 x 189 at 1 mm, axial slices
    assert all(image.pixels.shape == (1, 233, 197) for image in mni_images)
    assert [image.frame for image in mni_images] == list(range(189))
    assert len({image.window for image in mni_images}) == 1
    assert len({image.patient_key for image in mni_images}) == 1
    data = np.asarray(nib.load(sample_file("nilearn", MNI_T1)).dataobj, dtype=np.float64)
    low, high = np.percentile(data[data != 0], [0.5, 99.5])
    assert (mni_images[0].window.low, mni_images[0].window.high) == (low, high)
    assert mni_images[0].original_dtype == "uint8" and mni_images[0].spacing == (1.0, 1.0)
    assert_contract(mni_images)


def test_nifti_slices_are_radiological_in_world_coordinates(tmp_path: Path) -> None:
    # A volume stored in "PSL" order with anisotropic voxels; every voxel holds its own index,
    # so each output pixel tells which voxel (and so which world point) it came from.
    shape = (6, 5, 4)
    affine = np.array([[0.0, 0.0, -2.5, 10.0],   # k -> patient left (x decreases)
                       [-2.0, 0.0, 0.0, 20.0],   # i -> posterior (y decreases)
                       [0.0, 3.0, 0.0, -5.0],    # j -> superior
                       [0.0, 0.0, 0.0, 1.0]])
    assert nib.aff2axcodes(affine) == ("P", "S", "L")
    data = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)
    path = tmp_path / "psl.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    images = load_nifti(path, "mri")
    assert [image.frame for image in images] == list(range(5))  # the superior axis (j) is sliced
    assert all(image.pixels.shape == (1, 6, 4) for image in images)  # rows: y (i), columns: x (k)
    assert images[0].spacing == (2.0, 2.5)  # (row = y, column = x) in mm

    worlds = []
    for image in images:
        pixels = image.pixels[0].astype(np.float64)
        index = np.rint(image.window.to_units(pixels)).astype(int) - 1
        voxels = np.stack(np.unravel_index(index, shape), axis=-1)
        world = voxels @ affine[:3, :3].T + affine[:3, 3]
        world[(pixels <= 0.0) | (pixels >= 1.0)] = np.nan  # clipped pixels lose their identity
        worlds.append(world)
    worlds = np.stack(worlds)  # (slice, row, column, xyz)
    along_row = np.diff(worlds, axis=2)
    down_column = np.diff(worlds, axis=1)
    assert np.isfinite(along_row).sum() > 100 and np.isfinite(down_column).sum() > 100
    ok = np.isfinite(along_row[..., 0])
    assert np.all(along_row[..., 0][ok] < 0)  # columns: patient right (image left) -> patient left
    assert np.all(along_row[..., 1:][ok] == 0)
    ok = np.isfinite(down_column[..., 1])
    assert np.all(down_column[..., 1][ok] < 0)  # rows: anterior (top) -> posterior
    assert np.all(down_column[..., [0, 2]][ok] == 0)
    z_per_slice = np.nanmean(worlds[..., 2], axis=(1, 2))
    assert np.all(np.diff(z_per_slice) > 0)  # frames: inferior -> superior


def test_reoriented_copy_of_mni_gives_the_same_slices(tmp_path: Path, mni_images: list) -> None:
    original = nib.load(sample_file("nilearn", MNI_T1))
    # Swap x/y and flip all axes: same anatomy, different storage order (affine compensates).
    reoriented = original.as_reoriented(np.array([[1, -1], [0, -1], [2, -1]]))
    assert nib.aff2axcodes(reoriented.affine) != nib.aff2axcodes(original.affine)
    path = tmp_path / "mni_reoriented.nii"
    nib.save(reoriented, path)
    again = load_image(path, "mri")
    assert len(again) == len(mni_images)
    for first, second in zip(mni_images, again, strict=True):
        np.testing.assert_array_equal(first.pixels, second.pixels)
    assert again[0].window == mni_images[0].window


def test_slice_step_and_foreground_filter(mni_images: list) -> None:
    path = sample_file("nilearn", MNI_T1)
    stepped = load_image(path, "mri", slice_step=6)
    assert [image.frame for image in stepped] == list(range(0, 189, 6))

    kept = load_image(path, "mri", min_foreground_fraction=0.15)
    fraction = {image.frame: float(np.mean(image.pixels > L.FOREGROUND_THRESHOLD)) for image in mni_images}
    assert 0 < len(kept) < len(mni_images)
    assert [image.frame for image in kept] == [frame for frame, value in fraction.items() if value >= 0.15]
    both = load_image(path, "mri", slice_step=6, min_foreground_fraction=0.15)
    assert [image.frame for image in both] == [i.frame for i in kept if i.frame % 6 == 0]


def test_4d_nifti_uses_first_volume() -> None:
    path = sample_file("nibabel", "example4d.nii.gz")  # 128x96x24x2 int16, LAS
    images = load_image(path, "mri")
    assert len(images) == 24 and images[0].pixels.shape == (1, 96, 128)
    assert "first volume" in images[0].extra["note"] and images[0].extra["volume_index"] == 0
    assert images[0].original_dtype == "int16" and images[0].spacing == pytest.approx((2.0, 2.0))
    # The file is LAS: the canonical (RAS) first volume, sliced as documented, is what comes out.
    first = nib.as_closest_canonical(nib.load(path).slicer[..., 0]).get_fdata()
    pixels = images[10].pixels[0]
    inside = (pixels > 0) & (pixels < 1)
    np.testing.assert_allclose(images[10].window.to_units(pixels)[inside], first[::-1, ::-1, 10].T[inside], atol=1e-3)
    assert_contract(images)


# ------------------------------------------------------------------------------------- Raster


def test_raster_windows_follow_dtype(tmp_path: Path) -> None:
    ramp8 = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    ramp16 = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp8).save(tmp_path / "eight.png")
    Image.fromarray(ramp16).save(tmp_path / "sixteen.png")
    Image.fromarray(ramp16).save(tmp_path / "sixteen.tif")

    eight = only(load_image(tmp_path / "eight.png", "xray"))
    assert (eight.window.low, eight.window.high, eight.window.method) == (0.0, 255.0, "dtype_range")
    assert eight.original_dtype == "uint8"
    np.testing.assert_allclose(eight.pixels[0], ramp8 / 255.0, atol=1e-7)
    for name in ("sixteen.png", "sixteen.tif"):
        image = only(load_image(tmp_path / name, "xray"))
        assert (image.window.low, image.window.high, image.window.method) == (0.0, 65535.0, "dtype_range")
        assert image.original_dtype == "uint16"
        np.testing.assert_allclose(image.window.to_units(image.pixels[0]), ramp16, atol=0.01)
        assert_contract([image])


def test_colour_and_jpeg_raster(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    image = only(load_image(tmp_path / "colour.png", "xray"))
    assert "grayscale" in image.extra["converted"] and image.pixels.shape == (1, 32, 48)
    expected = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    np.testing.assert_allclose(image.pixels[0], expected, atol=1e-7)

    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    jpeg = only(load_image(tmp_path / "gray.jpg", "xray"))
    np.testing.assert_allclose(jpeg.pixels[0], np.asarray(Image.open(tmp_path / "gray.jpg")) / 255.0, atol=1e-7)

    Image.fromarray(np.linspace(-1, 3, 32 * 32, dtype=np.float32).reshape(32, 32)).save(tmp_path / "float.tif")
    floating = only(load_image(tmp_path / "float.tif", "xray"))
    assert floating.window.method == "percentile" and floating.original_dtype == "float32"


def test_constant_png_is_zeros_not_error(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 77, dtype=np.uint8)).save(tmp_path / "flat.png")
    image = only(load_image(tmp_path / "flat.png", "xray"))
    assert np.all(image.pixels == 0.0)
    assert image.window.low == image.window.high == 77.0
    assert image.extra["raw_min"] == image.extra["raw_max"] == 77.0
    np.testing.assert_array_equal(image.window.to_units(image.pixels), 77.0)


def test_raster_patient_ids_and_source(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "00000001_000.png"
    Image.fromarray(np.eye(8, dtype=np.uint8) * 200).save(path)
    mapped = only(load_raster(path, "xray", root=tmp_path, patient_ids={"images/00000001_000.png": "42"}))
    assert mapped.source == "images/00000001_000.png" and mapped.patient_key == patient_key("42")
    by_name = only(load_image(path, "xray", root=tmp_path, patient_ids={"00000001_000.png": "42"}))
    assert by_name.patient_key == patient_key("42")
    unmapped = only(load_image(path, "xray", root=tmp_path))
    assert unmapped.patient_key == patient_key("00000001_000")
    with pytest.raises(LoadError) as caught:
        load_image(path, "xray", root=tmp_path / "elsewhere")
    assert caught.value.reason == L.REASON_OUTSIDE_ROOT


# ------------------------------------------------------------------------------------- Dispatch


def test_dicom_without_extension_or_preamble(tmp_path: Path) -> None:
    reference = only(load_image(pydicom_file("CT_small.dcm"), "ct"))
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "1.2.840.113619.2.55.3")  # named by UID
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "scan.ima")  # DICM preamble wins over the name
    bare = pydicom.Dataset()
    bare.update(pydicom.dcmread(pydicom_file("CT_small.dcm")))
    pydicom.dcmwrite(tmp_path / "bare", bare, implicit_vr=True, little_endian=True)
    assert (tmp_path / "bare").read_bytes()[128:132] != b"DICM"
    for name in ("1.2.840.113619.2.55.3", "scan.ima", "bare"):
        image = only(load_image(tmp_path / name, "ct", root=tmp_path))
        assert image.source == name
        np.testing.assert_array_equal(image.pixels, reference.pixels)


def _cut(source: Path, target: Path, size: int) -> Path:
    target.write_bytes(source.read_bytes()[:size])
    return target


def _nifti(target: Path, values: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(values.astype(np.float32), np.eye(4)), target)
    return target


def _text(target: Path, text: str) -> Path:
    target.write_text(text)
    return target


def _png(target: Path) -> Path:
    """A 64x64 16-bit PNG of noise (about 8 kB: a cut at 200 bytes lands inside its pixel data)."""
    noise = np.random.default_rng(1).integers(0, 65536, size=(64, 64), dtype=np.uint16)
    Image.fromarray(noise).save(target)
    return target


NAN_VOLUME = np.where(np.eye(8)[:, :, None] > 0, np.nan, 1.0) * np.ones((8, 8, 3))
INF_VOLUME = np.where(np.eye(8)[:, :, None] > 0, np.inf, 1.0) * np.ones((8, 8, 3))

BAD_INPUTS = {
    "empty dcm": (lambda d: _cut(pydicom_file("CT_small.dcm"), d / "empty.dcm", 0), L.REASON_EMPTY),
    "empty png": (lambda d: _cut(_png(d / "full.png"), d / "empty.png", 0), L.REASON_EMPTY),
    "truncated pixels": (lambda d: _cut(pydicom_file("CT_small.dcm"), d / "half.dcm", 19603), L.REASON_CORRUPT_DICOM),
    "truncated header": (lambda d: _cut(pydicom_file("CT_small.dcm"), d / "head.dcm", 1000), L.REASON_CORRUPT_DICOM),
    "text named dcm": (lambda d: _text(d / "x.dcm", "not an image\n" * 20), L.REASON_NOT_DICOM),
    "rt plan": (lambda d: Path(shutil.copy(pydicom_file("rtplan.dcm"), d / "plan.dcm")), L.REASON_NO_PIXEL_DATA),
    "nan nifti": (lambda d: _nifti(d / "nan.nii.gz", NAN_VOLUME), L.REASON_NON_FINITE),
    "inf nifti": (lambda d: _nifti(d / "inf.nii", INF_VOLUME), L.REASON_NON_FINITE),
    "cut nifti": (lambda d: _cut(sample_file("nilearn", MNI_T1), d / "cut.nii.gz", 100_000), L.REASON_UNREADABLE_NIFTI),
    "text nifti": (lambda d: _text(d / "t.nii", "no header"), L.REASON_UNREADABLE_NIFTI),
    "cut png": (lambda d: _cut(_png(d / "full.png"), d / "cut.png", 200), L.REASON_UNREADABLE_IMAGE),
    "text png": (lambda d: _text(d / "t.png", "not a png"), L.REASON_UNREADABLE_IMAGE),
    "unknown extension": (lambda d: _text(d / "notes.xyz", "x"), L.REASON_UNKNOWN_TYPE),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_named_load_error(case: str, tmp_path: Path) -> None:
    make, reason = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct")
    err = caught.value
    assert err.reason == reason, str(err)
    assert err.path == str(path) and str(err).startswith(f"{path}: {reason}") and ". Fix: " in str(err)
    assert err.fix


@pytest.mark.parametrize(("make", "limit"), [
    (lambda d: _cut(pydicom_file("CT_small.dcm"), d / "half.dcm", 19603), 128 * 128),
    (lambda d: _cut(_png(d / "full.png"), d / "cut.png", 200), 64 * 64),
    (lambda d: _cut(sample_file("nilearn", MNI_T1), d / "cut.nii.gz", 100_000), 197 * 233 * 189),
], ids=["dicom", "png", "nifti"])
def test_size_guard_reads_only_the_header(make, limit: int, tmp_path: Path) -> None:
    # The pixel data of these files is cut short: "too large" can only come from the header.
    path = make(tmp_path)
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct", max_pixels=limit - 1)
    assert caught.value.reason == L.REASON_TOO_LARGE and str(limit) in str(caught.value)
    with pytest.raises(LoadError) as caught:
        load_image(path, "ct", max_pixels=limit)
    assert caught.value.reason != L.REASON_TOO_LARGE


def test_max_pixels_counts_all_frames() -> None:
    path = store_file("emri_small.dcm")
    assert len(load_dicom(path, "mri", max_pixels=10 * 64 * 64)) == 10
    with pytest.raises(LoadError, match="image too large"):
        load_dicom(path, "mri", max_pixels=10 * 64 * 64 - 1)


def test_one_frame_is_decoded_and_counted_alone() -> None:
    """``frame`` decodes that frame only: the size guard counts its pixels, not the file's (a
    120-frame cine is as cheap as one frame), its pixels and index are the full load's, and an
    index outside the file is refused by name."""
    path = store_file("color3d_jpeg_baseline.dcm")  # 120 frames of colour ultrasound, 480 x 640
    every = load_dicom(path, "xray")
    rows, columns = every[0].pixels.shape[1:]
    with pytest.raises(LoadError, match="image too large"):
        load_dicom(path, "xray", max_pixels=rows * columns)
    [one] = load_dicom(path, "xray", frame=57, max_pixels=rows * columns)
    assert one.frame == 57 and one.extra["frames_in_file"] == 120 == len(every)
    assert np.array_equal(one.pixels, every[57].pixels) and one.window == every[57].window
    with pytest.raises(LoadError) as caught:
        load_dicom(path, "xray", frame=120)
    assert caught.value.reason == L.REASON_FRAME_OUT_OF_RANGE and "between 0 and 119" in caught.value.fix
    [single] = load_dicom(pydicom_file("CT_small.dcm"), "ct", frame=0)
    assert single.frame is None


def test_invalid_arguments_and_missing_file(tmp_path: Path) -> None:
    path = pydicom_file("CT_small.dcm")
    for kwargs in ({"modality": "pet"}, {"modality": "ct", "slice_step": 0},
                   {"modality": "ct", "min_foreground_fraction": 1.5}):
        with pytest.raises(LoadError, match="invalid argument"):
            load_image(path, **kwargs)
    with pytest.raises(LoadError, match="file not found"):
        load_image(tmp_path / "missing.dcm", "ct")


def test_load_error_format_and_pickling() -> None:
    err = LoadError("raw/ct/a.dcm", "empty file", "download it again")
    assert str(err) == "raw/ct/a.dcm: empty file. Fix: download it again"
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.reason, copy.fix, str(copy)) == (err.path, err.reason, err.fix, str(err))


def test_sample_file_names_the_package_to_install() -> None:
    assert sample_file("pydicom", "test_files/CT_small.dcm") == pydicom_file("CT_small.dcm")
    assert store_file("RG1_UNCI.dcm").is_file()
    with pytest.raises(FileNotFoundError, match="pip install pydicom-data"):
        sample_file("pydicom-data", "no_such_file.dcm")
    with pytest.raises(FileNotFoundError, match="not_a_package"):
        sample_file("not_a_package", "x.dcm")


def test_supported_suffixes_are_dispatched() -> None:
    assert set(L.SUPPORTED_SUFFIXES) == {".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def test_foreground_rule_drops_volume_slices_only(tmp_path: Path) -> None:
    """A 2-D image is never dropped by the volume-slice foreground rule: a 12-bit image stored in a
    16-bit PNG reads as dark against the 16-bit range, yet it is a valid X-ray."""
    from medsr.data.ingest import IngestOptions, ingest

    stored = pydicom.dcmread(pydicom_file("CT_small.dcm")).pixel_array.astype(np.float64)
    twelve_bit = np.round((stored - stored.min()) / (stored.max() - stored.min()) * 4095).astype(np.uint16)
    png = tmp_path / "raw" / "xray" / "twelve_bit.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(twelve_bit).save(png)
    image = only(load_image(png, "xray", min_foreground_fraction=0.15))
    assert float(np.mean(image.pixels > L.FOREGROUND_THRESHOLD)) < 0.15  # the rule would have dropped it
    # A single-frame DICOM is one 2-D image too, whatever its foreground.
    assert len(load_image(pydicom_file("CT_small.dcm"), "ct", min_foreground_fraction=1.0)) == 1

    table = ingest(tmp_path / "raw", tmp_path / "interim", IngestOptions(tile_size=256, min_foreground_fraction=0.15),
                   {"xray": "local"})
    assert len(table) == 1 and table["error"].isna().all(), table["error"].tolist()
