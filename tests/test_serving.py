"""The BentoML service over HTTP: a real `bentoml serve` on 127.0.0.1 against a temporary MLflow
registry holding untrained generators (espcn x4 champion = version 1, bicubic x4 = version 2,
espcn x2 champion), exercised endpoint by endpoint and with every kind of bad input."""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import copy
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsr.consistency import consistency_psnr
from medsr.data.sample_files import sample_file
from serving import QUIET_ENV, REPO_ROOT, ServiceProcess, register_generator
from serving.metrics import PHASES

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "PID-SECRET-4242"
SECRET_FILE_NAME = "Janet_Doe_PID-SECRET-4242.dcm"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
ERROR_KEYS = {"error", "fix", "status", "request_id"}
STARTUP_S = 400.0  # the machine is shared: model loading has taken 80 s under others' training


# ------------------------------------------------------------------------------------- fixtures


def make_registry(root: Path, entries: list[tuple[str, int, bool]]) -> tuple[str, dict[tuple[str, int], str]]:
    """A fresh SQLite MLflow store under ``root`` with the given (architecture, scale, champion)."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        versions = {(arch, scale): register_generator(arch, scale, artifact_dir=root / "artifacts", champion=champion)
                    for arch, scale, champion in entries}
    finally:
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
        mlflow.set_tracking_uri(previous_uri)
    return uri, versions


def params_file(folder: Path, **serving: Any) -> Path:
    """The repository's params.yaml with some `serving:` values changed."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["serving"] = {**copy.deepcopy(params.get("serving", {})), **serving}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("registry")
    uri, versions = make_registry(root, [("espcn", 4, True), ("bicubic", 4, False), ("espcn", 2, True)])
    return {"uri": uri, "root": root, "versions": versions}


@pytest.fixture(scope="module")
def service(registry: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    folder = tmp_path_factory.mktemp("service")
    params = params_file(folder, max_upload_bytes=MAX_UPLOAD_BYTES)
    log = folder / "service.log"
    with ServiceProcess(env={"MLFLOW_TRACKING_URI": registry["uri"], "MEDSR_PARAMS": str(params)},
                        log_path=log, device="auto", startup_timeout=STARTUP_S) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=300.0) as http:
        yield http


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad inputs, written once."""
    folder = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {}

    ct = pydicom.dcmread(sample_file("pydicom", "CT_small.dcm"))
    ct.PatientName, ct.PatientID = PATIENT_NAME, PATIENT_ID
    out["ct"] = folder / SECRET_FILE_NAME
    ct.save_as(out["ct"])

    out["truncated_dicom"] = folder / "truncated.dcm"
    out["truncated_dicom"].write_bytes(out["ct"].read_bytes()[:20000])
    out["corrupt_dicom"] = folder / "corrupt.dcm"
    out["corrupt_dicom"].write_bytes(b"\x00" * 128 + b"DICM" + np.random.default_rng(0).bytes(4000))

    png = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)).save(png, format="PNG")
    out["png16"] = folder / "gray16.png"
    out["png16"].write_bytes(png.getvalue())
    out["truncated_png"] = folder / "cut.png"
    out["truncated_png"].write_bytes(png.getvalue()[: len(png.getvalue()) // 2])

    out["too_large_png"] = folder / "huge.png"
    Image.fromarray(np.zeros((2100, 2100), np.uint8)).save(out["too_large_png"])  # x4: 70.6 MP > 67.1 MP
    nan = np.full((32, 32), 0.5, np.float32)
    nan[5, 7] = np.nan
    out["nan_tiff"] = folder / "nan.tif"
    Image.fromarray(nan, mode="F").save(out["nan_tiff"])
    out["text"] = folder / "notes.png"
    out["text"].write_text("this is not an image\n" * 20)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    four = FileDataset(str(folder / "four.dcm"), {}, file_meta=meta, preamble=b"\x00" * 128)
    four.SOPClassUID, four.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    four.Modality, four.PatientName, four.PatientID = "MR", PATIENT_NAME, PATIENT_ID
    four.StudyInstanceUID, four.SeriesInstanceUID = generate_uid(), generate_uid()
    four.set_pixel_data((np.arange(4 * 32 * 32).reshape(4, 32, 32) % 4000).astype(np.uint16), "MONOCHROME2", 12)
    out["four_frames"] = folder / "four.dcm"
    four.save_as(out["four_frames"], enforce_file_format=True)

    single = pydicom.dcmread(out["four_frames"])
    single.set_pixel_data(np.full((16, 16), 100, np.uint16), "MONOCHROME2", 12)
    del single.PixelData
    out["no_pixels"] = folder / "no_pixels.dcm"
    single.save_as(out["no_pixels"], enforce_file_format=True)
    single.add_new(0x7FE00010, "OW", b"")
    out["empty_pixels"] = folder / "empty_pixels.dcm"
    single.save_as(out["empty_pixels"], enforce_file_format=True)
    lossy = pydicom.dcmread(sample_file("pydicom", "JPEG-lossy.dcm"))
    lossy.PixelData = lossy.PixelData[: len(lossy.PixelData) // 3] + b"\x00" * 16
    out["damaged_jpeg_dicom"] = folder / "damaged_jpeg.dcm"
    lossy.save_as(out["damaged_jpeg_dicom"])
    out["big_endian"] = Path(sample_file("pydicom", "ExplVR_BigEnd.dcm"))

    import gzip

    import nibabel as nib

    out["nifti_4d"] = folder / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 10, 3, 4), np.int16), np.eye(4)), out["nifti_4d"])
    out["nifti"] = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(12 * 10 * 2).reshape(12, 10, 2).astype(np.int16), np.eye(4)), out["nifti"])
    out["truncated_nifti"] = folder / "cut.nii.gz"
    out["truncated_nifti"].write_bytes(out["nifti"].read_bytes()[:60])
    out["nifti_header_only"] = folder / "header.nii"
    out["nifti_header_only"].write_bytes(gzip.decompress(out["nifti"].read_bytes())[:352])
    out["gif"] = folder / "anim.gif"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(out["gif"], format="GIF")
    out["bmp"] = folder / "scan.bmp"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(out["bmp"], format="BMP")
    out["empty"] = folder / "empty.png"
    out["empty"].write_bytes(b"")
    out["random_dcm"] = folder / "random.dcm"
    out["random_dcm"].write_bytes(np.random.default_rng(1).bytes(3000))
    out["int32_tiff"] = folder / "wide.tif"
    Image.fromarray(np.linspace(-50_000, 900_000, 24 * 20).reshape(24, 20).astype(np.int32)).save(out["int32_tiff"])
    out["rgb_png"] = folder / "colour.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out["rgb_png"])
    import tifffile

    out["float64_tiff"] = folder / "double.tif"
    tifffile.imwrite(out["float64_tiff"], np.random.default_rng(3).random((16, 16)))
    # Inputs that came back as a 500 or a wrong success (issue 22); tests/test_serving_depths.py checks their values.
    from test_serving_depths import dicom_with, smooth

    out["int32_dicom"] = dicom_with(folder / "int32.dcm", smooth((16, 16), -2e9, 2e9).astype("<i4"), "MONOCHROME2")
    out["float_dicom"] = dicom_with(folder / "float.dcm", smooth((16, 16), -3, 700).astype("<f4"), "MONOCHROME2",
                                    keyword="FloatPixelData")
    out["rgb16_png"] = folder / "rgb16.png"
    grey = smooth((16, 20), 100, 65000)
    out["rgb16_png"].write_bytes(imagecodecs.png_encode(np.stack([grey, grey / 2, grey / 3], axis=-1).astype(np.uint16)))
    out["int16_tiff"] = folder / "signed.tif"
    tifffile.imwrite(out["int16_tiff"], smooth((16, 16), -1000, 3000).astype(np.int16))
    out["nifti_2d"] = folder / "plane.nii.gz"
    nib.save(nib.Nifti1Image(smooth((12, 10), 0, 900).astype(np.int16), np.eye(4)), out["nifti_2d"])
    out["exif_jpeg"] = folder / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth((16, 32), 0, 255).astype(np.uint8)).save(out["exif_jpeg"], exif=exif, quality=95)
    return out


def upload(client: httpx.Client, path: Path, route: str = "/upscale", **fields: Any) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post(route, files={"file": (path.name, handle)}, data={k: str(v) for k, v in fields.items()})


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert ERROR_KEYS <= set(body), body
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["fix"], body
    for word in words:
        assert word.lower() in body["error"].lower(), body
    return body


# ------------------------------------------------------------------------------ probes and info


def test_health_readiness_metrics_and_request_ids(client: httpx.Client) -> None:
    for probe in ("/livez", "/readyz"):
        response = client.get(probe)
        assert response.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert client.get("/readyz", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
    assert client.get("/readyz", headers={"X-Request-ID": "bad id\twith junk"}).headers["x-request-id"] != "bad id\twith junk"
    missing = client.get("/no-such-page")
    assert_error(missing, 404, "not found")
    assert client.post("/upscale_array", json={"images": [{"image": [[0.5, 0.25]], "scale": 4}]}).status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "x-request-id" in metrics.headers
    assert 'medsr_requests_total{endpoint="/upscale_array",status="200"}' in metrics.text
    assert "medsr_consistency_psnr_db_bucket" in metrics.text


def test_info_and_samples(client: httpx.Client, registry: dict[str, Any]) -> None:
    info = client.get("/info").json()
    assert info["ready"] and info["scales"] == [4, 2]
    assert info["models"]["4"]["version"] == registry["versions"][("espcn", 4)]
    assert info["models"]["4"]["architecture"] == "espcn" and info["models"]["2"]["registered_name"] == "medsr-x2"
    samples = client.get("/samples").json()["samples"]
    ids = {sample["id"] for sample in samples}
    assert {"xray-rg1-unci", "ct-ct-small"} <= ids
    sample = client.get("/samples/ct-ct-small")
    assert sample.status_code == 200 and sample.content[128:132] == b"DICM"
    assert_error(client.get("/samples/nope"), 404, "no sample")
    page = client.get("/")
    assert page.status_code == 200 and "MedSR" in page.text and client.get("/static/app.js").status_code == 200


# ---------------------------------------------------------------------------------- /upscale


def test_dicom_round_trip_readable_by_pydicom_and_dcmdump(client: httpx.Client, files: dict[str, Path],
                                                         tmp_path: Path) -> None:
    original = pydicom.dcmread(files["ct"])
    response = upload(client, files["ct"], scale=4)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    consistency = float(response.headers["x-medsr-consistency-psnr"])
    assert 20.0 < consistency <= 100.0 and response.headers["x-medsr-consistency-warning"] in ("true", "false")
    assert response.headers["x-medsr-model"] == "medsr-x4/espcn" and response.headers["x-medsr-model-version"] == "1"
    timing = dict(re.findall(r"([a-z]+);dur=([0-9.]+)", response.headers["server-timing"]))
    assert {"read", "decode", "forward", "consistency", "encode", "write", "total"} <= set(timing), timing
    assert set(timing) <= {*PHASES, "total"}
    # total is the wall clock: at least the network's time, at most the phases' sum (the score overlaps the encoder)
    phases_sum = sum(float(v) for k, v in timing.items() if k != "total")
    assert float(timing["forward"]) <= float(timing["total"]) <= 1.05 * phases_sum + 10  # nearly every ms attributed

    out = pydicom.dcmread(io.BytesIO(response.content))
    assert (out.Rows, out.Columns) == (512, 512)
    assert out.SOPInstanceUID != original.SOPInstanceUID and out.SeriesInstanceUID != original.SeriesInstanceUID
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 4 for v in original.PixelSpacing], rel=1e-5)
    assert out.ImageType[0] == "DERIVED"
    assert "medsr-x4 version 1" in out.DerivationDescription and "espcn" in out.DerivationDescription
    assert out.pixel_array.dtype == original.pixel_array.dtype
    hu_in = pydicom.pixels.apply_modality_lut(original.pixel_array, original)
    hu_out = pydicom.pixels.apply_modality_lut(out.pixel_array, out)
    assert abs(float(hu_out.mean()) - float(hu_in.mean())) < 10.0  # HU, not stored values or [0, 1]

    saved = tmp_path / "result.dcm"
    saved.write_bytes(response.content)
    dump = subprocess.run(["dcmdump", "+P", "0008,0008", "+P", "0008,2111", "+P", "0028,0010", "+P", "0028,0011",
                           "+P", "0028,0030", "+P", "0008,0018", "+P", "0020,000e", str(saved)],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "DERIVED" in dump.stdout and "MedSR" in dump.stdout
    assert "US 512" in dump.stdout and out.SOPInstanceUID in dump.stdout and out.SeriesInstanceUID in dump.stdout
    assert original.SOPInstanceUID not in dump.stdout


def test_nifti_and_raster_come_back_in_their_format(client: httpx.Client, files: dict[str, Path],
                                                   tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.zeros((24, 20, 2), np.int16)
    volume[6:18, 4:16] = 300
    path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.2, 1.2, 4.0, 1.0])), path)
    response = upload(client, path, scale=2)
    assert response.status_code == 200, response.text
    assert response.headers["x-medsr-frames"] == "2" and response.headers["x-medsr-model"] == "medsr-x2/espcn"
    import gzip

    out = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert out.shape == (48, 40, 2) and out.header.get_zooms() == pytest.approx((0.6, 0.6, 4.0))

    png = upload(client, files["png16"], scale=4)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.mode == "I;16" and image.size == (160, 192)


def test_model_version_picks_a_registry_version(client: httpx.Client, files: dict[str, Path],
                                                registry: dict[str, Any]) -> None:
    bicubic = registry["versions"][("bicubic", 4)]
    response = upload(client, files["png16"], scale=4, model_version=bicubic)
    assert response.status_code == 200, response.text
    assert response.headers["x-medsr-model"] == "medsr-x4/bicubic" and response.headers["x-medsr-model-version"] == bicubic
    assert_error(upload(client, files["png16"], scale=4, model_version=99), 422, "99")


def test_2k_chest_xray_at_x4_in_bounded_memory(client: httpx.Client, service: ServiceProcess,
                                               registry: dict[str, Any]) -> None:
    """RG1_UNCI: chest CR 1955x1841, MONOCHROME1 -> 7820x7364 (57.6 MP), through the espcn champion."""
    source = sample_file("pydicom-data", "RG1_UNCI.dcm")
    # The peak of this request, not of every request the module sent before it: Linux resets a
    # process's high-water mark (VmHWM) to its current RSS when "5" is written to clear_refs.
    for pid in service.server_pids()[1:]:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    response = upload(client, source, scale=4)
    assert response.status_code == 200, response.text
    out = pydicom.dcmread(io.BytesIO(response.content))
    assert (out.Rows, out.Columns) == (1955 * 4, 1841 * 4)
    assert out.PhotometricInterpretation == "MONOCHROME1" and out.ImageType[0] == "DERIVED"
    assert float(response.headers["x-medsr-consistency-psnr"]) > 30.0
    # Peak memory of the worker: tiles keep the network's activations small. Measured here: the
    # tiled request peaks near 2.2 GiB in all; a whole-image ESPCN forward alone adds 2.8 GiB
    # (64 channels x 3.6 MP x 4 B per layer), which would break this bound.
    peaks = []
    for pid in service.server_pids()[1:]:
        status = Path(f"/proc/{pid}/status").read_text()
        peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)  # type: ignore[union-attr]
    assert peaks and max(peaks) < 3.0 * 2**30, f"worker peak memory {max(peaks) / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- /upscale_array


def test_array_endpoint_lists_and_base64_with_consistency(client: httpx.Client) -> None:
    rng = np.random.default_rng(5)
    small = rng.random((12, 10)).round(4)
    tile = rng.random((64, 48)).astype("<f4")
    body = {"images": [{"image": small.tolist(), "scale": 2},
                       {"data": base64.b64encode(tile.tobytes()).decode(), "shape": [64, 48], "scale": 4}]}
    response = client.post("/upscale_array", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert first["shape"] == [24, 20] and np.asarray(first["image"]).shape == (24, 20)
    assert first["model"] == "medsr-x2/espcn" and first["scale"] == 2
    decoded = np.frombuffer(base64.b64decode(second["data"]), "<f4").reshape(second["shape"])
    assert decoded.shape == (256, 192) and 0.0 <= decoded.min() and decoded.max() <= 1.0
    for result in (first, second):
        assert result["consistency_psnr"] > 10.0 and isinstance(result["consistency_warning"], bool)


def test_adaptive_batching_merges_concurrent_requests(client: httpx.Client, service: ServiceProcess) -> None:
    tile = np.random.default_rng(6).random((48, 48)).astype("<f4")
    body = {"images": [{"data": base64.b64encode(tile.tobytes()).decode(), "shape": [48, 48], "scale": 4}]}

    def send(_: int) -> int:
        with httpx.Client(base_url=service.url, timeout=120.0) as own:
            return own.post("/upscale_array", json=body).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(send, range(48)))
    assert statuses == [200] * 48
    text = client.get("/metrics").text
    count = sum(float(v) for v in re.findall(r'adaptive_batch_size_count\{[^}]*method_name="upscale_array"[^}]*\} (\S+)', text))
    single = sum(float(v) for v in re.findall(
        r'adaptive_batch_size_bucket\{[^}]*le="1\.0"[^}]*method_name="upscale_array"[^}]*\} (\S+)', text))
    assert count > 0 and single < count, "no batch held more than one request"


# ------------------------------------------------------------------------------------ /demo


def test_demo_comparison_json(client: httpx.Client, files: dict[str, Path]) -> None:
    known = upload(client, files["ct"], route="/demo", scale=4, noise=0.02, blur=0.8, known_original="true")
    assert known.status_code == 200, known.text
    body = known.json()
    assert body["sizes"] == {"lr": [32, 32], "output": [128, 128]} and body["noise"]["kind"] == "poisson"
    assert all(body["images"][k].startswith("data:image/png;base64,") for k in ("lr", "bicubic", "model", "original"))
    assert set(body["scores"]) == {"bicubic", "model"} and 10.0 < body["scores"]["model"]["psnr"] < 60.0
    assert body["consistency_psnr"] > 10.0 and body["request_id"] == known.headers["x-request-id"]

    as_is = upload(client, files["ct"], route="/demo", scale=2, noise=0.0, blur=0.0, known_original="false").json()
    assert as_is["scores"] == {} and as_is["images"]["original"] is None and as_is["sizes"]["output"] == [256, 256]
    assert_error(upload(client, files["ct"], route="/demo", noise=3.0), 422, "noise")



def test_demo_and_upscale_return_the_same_pixels(client: httpx.Client, tmp_path: Path) -> None:
    """The page's image, its 16-bit download and its consistency score are /upscale's for the same
    input and settings (the service runs the consistency step: params serving.refine)."""
    y, x = np.mgrid[0:40, 0:36]
    wave = 0.5 + 0.5 * np.sin(x / 3.0) * np.cos(y / 5.0)
    path = tmp_path / "wave.png"
    Image.fromarray(np.rint((wave - wave.min()) / np.ptp(wave) * 65535).astype(np.uint16)).save(path)

    served = upload(client, path, scale=4)
    assert served.status_code == 200, served.text
    page = upload(client, path, route="/demo", scale=4, noise=0.0, blur=0.0, known_original="false")
    assert page.status_code == 200, page.text
    body = page.json()
    download = base64.b64decode(body["download"]["png16"].split(",", 1)[1])
    page_pixels = imagecodecs.png_decode(download).astype(np.int64)
    served_pixels = np.asarray(Image.open(io.BytesIO(served.content))).astype(np.int64)
    assert page_pixels.shape == served_pixels.shape == (160, 144)
    assert np.abs(page_pixels - served_pixels).max() <= 1  # the codecs' rounding, nothing else
    assert f"{body['consistency_psnr']:.3f}" == served.headers["x-medsr-consistency-psnr"]
    # The score re-degrades with the consistency step's own forward model (params consistency.blur_sigma).
    lr = (np.rint((wave - wave.min()) / np.ptp(wave) * 65535) / 65535.0).astype(np.float32)[None]
    blur = float(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["consistency"]["blur_sigma"])
    expected = consistency_psnr((served_pixels / 65535.0).astype(np.float32)[None], lr, 4, blur)
    assert float(served.headers["x-medsr-consistency-psnr"]) == pytest.approx(expected, abs=0.05)
    assert client.get("/info").json()["consistency"]["blur_sigma"] == blur

# -------------------------------------------------------------------------------- bad input


def bad_requests(files: dict[str, Path]) -> dict[str, tuple[dict[str, Any], int, str]]:
    """name -> (httpx request arguments, expected status, a word the error names)."""

    def multipart(path: Path, route: str = "/upscale", name: str | None = None, **fields: Any) -> dict[str, Any]:
        return {"method": "POST", "url": route, "files": {"file": (name or path.name, path.read_bytes())},
                "data": {k: str(v) for k, v in fields.items()}}

    def array(payload: Any) -> dict[str, Any]:
        return {"method": "POST", "url": "/upscale_array", "content": json.dumps(payload).encode(),
                "headers": {"content-type": "application/json"}}

    tile = base64.b64encode(np.zeros((600, 600), "<f4").tobytes()).decode()
    return {
        "truncated DICOM": (multipart(files["truncated_dicom"]), 400, "truncated"),
        "corrupt DICOM": (multipart(files["corrupt_dicom"]), 400, "corrupt"),
        "truncated PNG": (multipart(files["truncated_png"]), 400, "unreadable"),
        "text file as image": (multipart(files["text"]), 415, "unsupported file type"),
        "wrong content type": ({"method": "POST", "url": "/upscale", "content": b"hello",
                                "headers": {"content-type": "text/plain"}}, 415, "content type"),
        "garbage multipart": ({"method": "POST", "url": "/upscale", "content": b"not multipart at all",
                               "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
        "empty body": ({"method": "POST", "url": "/upscale", "content": b"",
                        "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "empty"),
        "no file field": ({"method": "POST", "url": "/upscale", "files": {"other": ("a.txt", b"x")},
                           "data": {"scale": "4"}}, 400, "file"),
        "file field as text": ({"method": "POST", "url": "/upscale", "files": {"scale": (None, "4")},
                                "data": {"file": "ct.dcm"}}, 400, "holds text"),
        "file field as text on /demo": ({"method": "POST", "url": "/demo", "files": {"scale": (None, "4")},
                                         "data": {"file": "ct.dcm"}}, 400, "holds text"),
        "300-character file name": (multipart(files["text"], name="J" * 300 + ".png"), 415, "unsupported file type"),
        "file name with a path": (multipart(files["truncated_png"], name="../../etc/passwd.png"), 400, "unreadable"),
        "empty file": (multipart(files["empty"]), 400, "empty file"),
        "GIF": (multipart(files["gif"]), 415, "unsupported file type"),
        "BMP": (multipart(files["bmp"]), 415, "unsupported file type"),
        "random bytes named .dcm": (multipart(files["random_dcm"]), 415, "not a DICOM"),
        "DICOM without pixel data": (multipart(files["no_pixels"]), 422, "no pixel data"),
        "DICOM with empty pixel data": (multipart(files["empty_pixels"]), 400, "empty pixel data"),
        "damaged JPEG DICOM": (multipart(files["damaged_jpeg_dicom"]), 400, "undecodable"),
        "4-D NIfTI": (multipart(files["nifti_4d"]), 422, "4-D"),
        "truncated NIfTI": (multipart(files["truncated_nifti"]), 400, "nifti"),
        "NIfTI header only": (multipart(files["nifti_header_only"]), 400, "nifti"),
        "frame for a NIfTI": (multipart(files["nifti"], scale=2, frame=0), 422, "frame does not apply"),
        "over max_output_pixels": (multipart(files["too_large_png"]), 413, "max_output_pixels"),
        "scale the model lacks": (multipart(files["png16"], scale=3), 422, "scale 3"),
        "negative scale": (multipart(files["png16"], scale=-4), 422, "scale -4"),
        "scale not a number": (multipart(files["png16"], scale="four"), 400, "scale"),
        "model_version not a number": (multipart(files["png16"], model_version="latest"), 400, "model_version"),
        "unknown modality": (multipart(files["png16"], modality="dental"), 422, "modality"),
        "NaN pixels": (multipart(files["nan_tiff"]), 422, "non-finite"),
        "4-frame DICOM": (multipart(files["four_frames"]), 422, "4 frames"),
        "frame out of range": (multipart(files["four_frames"], frame=9), 422, "frame 9"),
        "negative frame": (multipart(files["four_frames"], frame=-1), 422, "frame -1"),
        "unknown model version": (multipart(files["png16"], model_version=12345), 422, "12345"),
        "demo noise out of range": (multipart(files["png16"], route="/demo", noise=3.0), 422, "noise"),
        "demo multipart boundary mismatch": ({"method": "POST", "url": "/demo", "content": b"--abc\r\n\r\n",
                                              "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
                                             400, "multipart"),
        "GET on an API route": ({"method": "GET", "url": "/upscale"}, 405, "method"),
        "unknown route": ({"method": "POST", "url": "/upscale_everything", "content": b"x"}, 404, "not found"),
        "array not JSON": ({"method": "POST", "url": "/upscale_array", "content": b"{oops",
                            "headers": {"content-type": "application/json"}}, 400, "json"),
        "array wrong content type": ({"method": "POST", "url": "/upscale_array", "content": b"images",
                                      "headers": {"content-type": "text/plain"}}, 415, "content type"),
        "array missing images": (array({"pictures": []}), 400, "images"),
        "array images not a list": (array({"images": 5}), 400, "images"),
        "array NaN": (array({"images": [{"image": [[0.1, float("nan")]]}]}), 422, "nan"),
        "array out of range": (array({"images": [{"image": [[0.1, 7.5]]}]}), 422, "[0, 1]"),
        "array ragged rows": (array({"images": [{"image": [[0.1, 0.2], [0.3]]}]}), 422, "rectangle"),
        "array image and data": (array({"images": [{"image": [[0.1]], "data": "AAAA", "shape": [1, 1]}]}),
                                 422, "exactly one"),
        "array bad base64": (array({"images": [{"data": "!!!not base64!!!", "shape": [2, 2]}]}), 422, "base64"),
        "array data shorter than shape": (array({"images": [{"data": "AAAAAA==", "shape": [4, 4]}]}), 422, "bytes"),
        "array too large": (array({"images": [{"data": "AAAA", "shape": [5000, 5000]}]}), 413, "too large"),
        "array response too large": (array({"images": [{"data": tile, "shape": [600, 600], "scale": 4}] * 2}),
                                     413, "response too large"),
        "array scale the model lacks": (array({"images": [{"image": [[0.5]], "scale": 8}]}), 422, "scale 8"),
        **hostile_requests(files),
    }


def raw_multipart(parts: list[tuple[bytes, bytes]], route: str = "/upscale", boundary: bytes = b"medsrb") -> dict[str, Any]:
    """A multipart request built by hand from (part header, content) pairs (httpx cannot send a
    part without a name, or an oversize part header)."""
    body = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n" for head, content in parts)
    return {"method": "POST", "url": route, "content": body + b"--" + boundary + b"--\r\n",
            "headers": {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}}


def hostile_requests(files: dict[str, Path]) -> dict[str, tuple[dict[str, Any], int, str]]:
    """Inputs that hung or got a 500 (issue 22): JSON beyond limits, malformed multipart parts."""
    png = files["png16"].read_bytes()
    image = b'Content-Disposition: form-data; name="file"; filename="g.png"\r\nContent-Type: image/png'

    def raw_json(body: bytes) -> dict[str, Any]:
        return {"method": "POST", "url": "/upscale_array", "content": body, "headers": {"content-type": "application/json"}}

    return {
        "array scale 1e400": (raw_json(b'{"images": [{"image": [[0.5]], "scale": 1e400}]}'), 400, "out of range"),
        "array pixel 1e400": (raw_json(b'{"images": [{"image": [[1e400]]}]}'), 400, "out of range"),
        "array JSON nested 50,000 levels": (raw_json(b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400, "nested"),
        "array JSON nested 18 levels": (raw_json(b'{"images": [' + b"[" * 16 + b"]" * 16 + b"]}"), 400, "nested"),
        "array number of 300 digits": (raw_json(b'{"images": [{"image": [[0.5]], "scale": ' + b"9" * 300 + b"}]}"),
                                       400, "characters"),
        "array not UTF-8": (raw_json(b'{"images": "\xff\xfe"}'), 400, "json"),
        "part named File": ({"method": "POST", "url": "/upscale", "files": {"File": ("g.png", png)}}, 400, "case-sensitive"),
        "part without a name": (raw_multipart([(b'Content-Disposition: form-data; filename="g.png"', png)]),
                                400, "no field name"),
        "part without Content-Disposition": (raw_multipart([(b"Content-Type: image/png", png)]), 400, "no field name"),
        "part header over 4 KiB": (raw_multipart([(image + b"; x=" + b"a" * 6000, png)]), 400, "header"),
        "part with 20 header lines": (raw_multipart([(image + b"".join(b"\r\nX-%d: 1" % i for i in range(20)), png)]),
                                      400, "header lines"),
        "extra field carrying a file": ({"method": "POST", "url": "/upscale",
                                         "files": {"file": ("g.png", png), "extra": ("g.png", png)}}, 400, "unknown field"),
        "scale carrying a file": ({"method": "POST", "url": "/upscale",
                                   "files": {"file": ("g.png", png), "scale": ("g.png", png)}}, 400, "carries a file"),
        "scale sent twice": ({"method": "POST", "url": "/upscale", "files": {"file": ("g.png", png)},
                              "data": {"scale": ["2", "4"]}}, 400, "twice"),
        "file sent twice": ({"method": "POST", "url": "/upscale", "files": [("file", ("a.png", png)), ("file", ("b.png", png))]},
                            400, "twice"),
        "misspelt field": ({"method": "POST", "url": "/upscale", "files": {"file": ("g.png", png)},
                            "data": {"scael": "2"}}, 400, "unknown field"),
        "unknown demo field": ({"method": "POST", "url": "/demo", "files": {"file": ("g.png", png)},
                                "data": {"noize": "0.1"}}, 400, "unknown field"),
        "query parameter": ({"method": "POST", "url": "/upscale?scale=2", "files": {"file": ("g.png", png)}}, 400, "query"),
        "query parameter on the array route": ({**raw_json(b'{"images": [{"image": [[0.5]]}]}'),
                                                "url": "/upscale_array?scale=2"}, 400, "query"),
        "scale 1e400 as a form field": ({"method": "POST", "url": "/upscale", "files": {"file": ("g.png", png)},
                                         "data": {"scale": "1e400"}}, 400, "scale"),
        "frame not a number": ({"method": "POST", "url": "/upscale", "files": {"file": ("g.png", png)},
                                "data": {"frame": "first"}}, 400, "frame"),
        "model_version negative": ({"method": "POST", "url": "/upscale", "files": {"file": ("g.png", png)},
                                    "data": {"model_version": "-1"}}, 422, "model_version"),
        "demo blur out of range": ({"method": "POST", "url": "/demo", "files": {"file": ("g.png", png)},
                                    "data": {"blur": "99"}}, 422, "blur"),
        "demo seed not a number": ({"method": "POST", "url": "/demo", "files": {"file": ("g.png", png)},
                                    "data": {"seed": "lucky"}}, 400, "seed"),
        "64-bit float TIFF": ({"method": "POST", "url": "/upscale", "files": {"file": ("f.tif", files["float64_tiff"].read_bytes())}},
                              422, "64-bit float"),
        "array scale 0": (raw_json(b'{"images": [{"image": [[0.5]], "scale": 0}]}'), 422, "scale 0"),
        "array negative shape": (raw_json(b'{"images": [{"data": "AAAA", "shape": [-1, 1]}]}'), 422, "shape"),
        "array scale NaN": (raw_json(b'{"images": [{"image": [[0.5]], "scale": NaN}]}'), 400, "scale"),
        "array body a list": (raw_json(b"[1, 2, 3]"), 400, "object"),
        "array images of strings": (raw_json(b'{"images": ["x", "y"]}'), 400, "images"),
        "array JSON with a BOM": (raw_json(b'\xef\xbb\xbf{"images": [{"image": [[0.5]]}]}'), 400, "json"),
        "multipart without its closing delimiter": ({"method": "POST", "url": "/upscale", "content": b"--b\r\n" + image
                                                     + b"\r\n\r\n" + png, "headers": {
                                                         "content-type": "multipart/form-data; boundary=b"}}, 400, "multipart"),
    }


BAD_NAMES = [  # the catalogue's keys, in order (parametrize needs them before the fixtures exist)
    "truncated DICOM", "corrupt DICOM", "truncated PNG", "text file as image", "wrong content type",
    "garbage multipart", "empty body", "no file field", "file field as text", "file field as text on /demo",
    "300-character file name", "file name with a path", "empty file", "GIF", "BMP", "random bytes named .dcm",
    "DICOM without pixel data", "DICOM with empty pixel data", "damaged JPEG DICOM", "4-D NIfTI", "truncated NIfTI",
    "NIfTI header only", "frame for a NIfTI", "over max_output_pixels", "scale the model lacks", "negative scale",
    "scale not a number", "model_version not a number", "unknown modality", "NaN pixels", "4-frame DICOM",
    "frame out of range", "negative frame", "unknown model version", "demo noise out of range",
    "demo multipart boundary mismatch", "GET on an API route", "unknown route", "array not JSON",
    "array wrong content type", "array missing images", "array images not a list", "array NaN",
    "array out of range", "array ragged rows", "array image and data", "array bad base64",
    "array data shorter than shape", "array too large", "array response too large", "array scale the model lacks",
    "array scale 1e400", "array pixel 1e400", "array JSON nested 50,000 levels", "array JSON nested 18 levels",
    "array number of 300 digits", "array not UTF-8", "part named File", "part without a name",
    "part without Content-Disposition", "part header over 4 KiB", "part with 20 header lines",
    "extra field carrying a file", "scale carrying a file", "scale sent twice", "file sent twice", "misspelt field",
    "unknown demo field", "query parameter", "query parameter on the array route", "scale 1e400 as a form field",
    "frame not a number", "model_version negative", "demo blur out of range", "demo seed not a number",
    "64-bit float TIFF", "array scale 0", "array negative shape", "array scale NaN", "array body a list",
    "array images of strings", "array JSON with a BOM", "multipart without its closing delimiter",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_gets_a_named_4xx(client: httpx.Client, files: dict[str, Path], name: str) -> None:
    arguments, status, word = bad_requests(files)[name]
    assert_error(client.request(**arguments), status, word)


HANG_NAMES = ["array scale 1e400", "array JSON nested 50,000 levels", "part header over 4 KiB"]


@pytest.mark.parametrize("name", HANG_NAMES)
def test_inputs_that_hung_get_a_4xx_within_one_second(service: ServiceProcess, files: dict[str, Path], name: str) -> None:
    """Each once left its connection without an answer (or got a 500); a good request follows."""
    arguments, status, word = bad_requests(files)[name]
    with httpx.Client(base_url=service.url, timeout=5.0) as http:
        started = time.monotonic()
        response = http.request(**arguments)
        elapsed = time.monotonic() - started
        assert_error(response, status, word)
        assert elapsed < 1.0, f"{name}: answered in {elapsed:.2f} s"
        assert http.post("/upscale_array", json={"images": [{"image": [[0.25, 0.5], [0.75, 1.0]]}]}).status_code == 200


def _raw_http(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """Send a request by hand (to lie about or stream the body); returns (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server answered and closed early, which is the point
        data = b""
        while chunk := sock.recv(65536):  # "Connection: close": the server closes after answering
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def test_upload_limit_declared_and_streamed(service: ServiceProcess) -> None:
    boundary = "medsrboundary"
    declared = (f"POST /upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
                f"\r\nContent-Length: {MAX_UPLOAD_BYTES + 1}\r\nConnection: close\r\n\r\n").encode()
    status, body = _raw_http(service.port, declared, [])
    assert status == 413 and "max_upload_bytes" in body["error"], body

    streamed = (f"POST /upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}"
                "\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.dcm\"\r\n\r\n".encode()
    block = b"\x00" * (4 * 1024 * 1024)
    chunks = [f"{len(part):x}\r\n".encode() + part + b"\r\n"]
    chunks += [f"{len(block):x}\r\n".encode() + block + b"\r\n"] * 10
    status, body = _raw_http(service.port, streamed, chunks)
    assert status == 413 and "max_upload_bytes" in body["error"], body


def _result_values(kind: str, content: bytes) -> bytes:
    """What must repeat exactly: pixel values (DICOM results carry new UIDs and times, gzip a time)."""
    if "DICOM" in kind:
        return pydicom.dcmread(io.BytesIO(content)).pixel_array.tobytes()
    if "NIfTI" in kind:
        import gzip

        return gzip.decompress(content)
    return content


def _worker_rss(service: ServiceProcess) -> int:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in service.server_pids()[1:] if psutil.pid_exists(pid))


def test_every_kind_of_bad_input_interleaved_with_good_ones(client: httpx.Client, service: ServiceProcess,
                                                            files: dict[str, Path]) -> None:
    """Two rounds of every bad input above (84 kinds), a good request of a rotating kind after
    every fourth: no 5xx, every good answer identical to its reference, the same worker, and
    the worker's memory back within 10% of where it started."""
    workers_before = service.server_pids()
    catalogue = bad_requests(files)
    good = {
        "CT DICOM": lambda: upload(client, files["ct"], scale=4),
        "big-endian DICOM": lambda: upload(client, files["big_endian"], scale=4),
        "PNG with a 300-character name": lambda: client.post(
            "/upscale", files={"file": ("P" * 300 + ".png", files["png16"].read_bytes())}, data={"scale": "4"}),
        "int32 TIFF": lambda: upload(client, files["int32_tiff"], scale=2),
        "NIfTI": lambda: upload(client, files["nifti"], scale=2),
        "RGB PNG": lambda: upload(client, files["rgb_png"], scale=4),
        "int32 DICOM": lambda: upload(client, files["int32_dicom"], scale=2),
        "float DICOM": lambda: upload(client, files["float_dicom"], scale=2),
        "16-bit RGB PNG": lambda: upload(client, files["rgb16_png"], scale=2),
        "int16 TIFF": lambda: upload(client, files["int16_tiff"], scale=2),
        "2-D NIfTI": lambda: upload(client, files["nifti_2d"], scale=2),
        "EXIF JPEG": lambda: upload(client, files["exif_jpeg"], scale=2),
        "array": lambda: client.post("/upscale_array", json={"images": [{"image": [[0.25, 0.5], [0.75, 1.0]]}]}),
    }
    references = {}
    for name, send in good.items():
        answer = send()
        assert answer.status_code == 200, (name, answer.text)
        references[name] = answer.content
    assert good["RGB PNG"]().headers["x-medsr-converted"] == "rgb->luma"
    assert good["16-bit RGB PNG"]().headers["x-medsr-converted"] == "rgb->luma"
    assert "x-medsr-converted" not in good["int16 TIFF"]().headers
    for _ in range(2):  # warm every code path before measuring memory
        for name, send in good.items():
            send()
    memory_before = _worker_rss(service)
    good_names, sent_good, statuses = list(good), 0, collections.Counter()
    for index, name in enumerate([*BAD_NAMES, *BAD_NAMES]):
        arguments, status, _word = catalogue[name]
        response = client.request(**arguments)
        statuses[response.status_code] += 1
        assert response.status_code == status, (name, response.text)
        assert ERROR_KEYS <= set(response.json()), name
        if index % 4 == 3:
            kind = good_names[sent_good % len(good_names)]
            answer = good[kind]()
            assert answer.status_code == 200, (kind, answer.text)
            assert _result_values(kind, answer.content) == _result_values(kind, references[kind]), kind
            sent_good += 1
    assert sum(statuses.values()) == 2 * len(BAD_NAMES) and not [s for s in statuses if s >= 500]
    assert sent_good >= 25
    assert service.server_pids() == workers_before, "a worker was restarted"
    assert client.get("/readyz").status_code == 200
    memory_after = _worker_rss(service)
    assert memory_after <= 1.10 * memory_before, f"worker memory {memory_before / 2**20:.0f} -> {memory_after / 2**20:.0f} MiB"
    # /metrics counts what was sent: the gateway's 413 and validation's 422, not BentoML's 400.
    metrics = client.get("/metrics").text
    for status in ("413", "422", "400", "415"):
        assert f'medsr_requests_total{{endpoint="/upscale_array",status="{status}"}}' in metrics, status
    assert 'medsr_phase_seconds_count{endpoint="/upscale",phase="forward"}' in metrics


def test_metrics_stay_bounded_after_3000_random_paths(client: httpx.Client) -> None:
    """Every unknown path is one label: /metrics neither grows with random URLs nor holds their text."""
    rng = np.random.default_rng(22)
    for _ in range(2):  # every status of the unknown-path label exists before measuring
        client.get("/patient/warm-up")
        client.post("/patient/warm-up", content=b"x")
    before = len(client.get("/metrics").content)
    for index in range(3000):
        token = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), 12))
        response = client.request("POST" if index % 3 == 0 else "GET", f"/patient/Doe%5EJohn-{token}/{index}")
        assert response.status_code in (404, 405), response.text
    text = client.get("/metrics").text
    assert len(text) <= 2 * before, f"/metrics grew from {before} to {len(text)} bytes"
    assert "Doe" not in text and "patient" not in text and "John" not in text
    assert client.post("/upscale_array", json={"images": [{"image": [[0.25, 0.5], [0.75, 1.0]]}]}).status_code == 200


def _large_png(tmp_path: Path, side: int = 800) -> Path:
    path = tmp_path / f"large{side}.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 65535, (side, side)).astype(np.uint16)).save(path)
    return path


def test_busy_worker_answers_429_with_the_expected_wait(service: ServiceProcess, tmp_path: Path) -> None:
    """`threads` compute and the rest queue while their expected wait (queue x measured time per
    request / threads) is under serving.max_wait_s; the next gets 429 with Retry-After = that wait,
    while every admitted request is answered."""
    serving = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["serving"]
    computing, max_wait = int(serving["threads"]), float(serving["max_wait_s"])
    path = _large_png(tmp_path, 400)
    times = []
    with httpx.Client(base_url=service.url, timeout=300.0) as http:
        for _ in range(8):  # the gateway's mean time per request settles on these (it saw small ones before)
            started = time.monotonic()
            assert upload(http, path, scale=4).status_code == 200
            times.append(time.monotonic() - started)
    # The gateway times admission to release, less than a client's round trip (upload, encode,
    # transfer; more so on a loaded CI machine): the fastest round trip and twice the queue it
    # implies are more than the queue admits however the two differ.
    seconds = min(times)
    fill = computing + 2 * math.ceil(computing * max_wait / seconds) + 2

    def slow(_: int) -> httpx.Response:
        with httpx.Client(base_url=service.url, timeout=300.0) as own:
            return upload(own, path, scale=4)

    with concurrent.futures.ThreadPoolExecutor(max_workers=fill) as pool:
        answers = [future.result() for future in [pool.submit(slow, i) for i in range(fill)]]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert refused, f"no 429 among {fill} requests of ~{seconds:.2f} s each"
    assert_error(refused[0], 429, "expected wait")
    assert all(int(answer.headers["retry-after"]) >= math.ceil(max_wait) for answer in refused)
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) >= computing and set(statuses) <= {200, 429}, statuses


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("request_bytes", [
    b"GET /info HTTP/1.1 extra\r\nHost: x\r\n\r\n",                        # bad request line
    b"GET /info HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",           # header without a colon
    b"POST /upscale_array HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # TLS to the plain port
], ids=["request-line", "header", "chunked", "tls"])
def test_malformed_http_gets_the_json_error_format(service: ServiceProcess, request_bytes: bytes) -> None:
    """What uvicorn's parser refuses, before any app code runs, is a 400 in the one JSON format."""
    head, _, body = _raw_exchange(service.port, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/json" in head.lower(), head
    payload = json.loads(body)
    assert payload["status"] == 400 and payload["error"].startswith("malformed HTTP request") and payload["fix"]
    assert httpx.get(f"{service.url}/livez", timeout=10).status_code == 200


def _trickle(port: int, body: bytes, seconds: float, boundary: str) -> int:
    """Send ``body`` in 20 pieces over ``seconds``; the response's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     f"boundary={boundary}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        step = math.ceil(len(body) / 20)
        for start in range(0, len(body), step):
            sock.sendall(body[start:start + step])
            time.sleep(seconds / 20)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_slow_uploads_do_not_hold_up_a_good_request(service: ServiceProcess, files: dict[str, Path]) -> None:
    """4 uploads trickled over 10 s (more than `threads`) while good requests come and go: each good
    one is answered within 1 s, and the slow ones are answered too once their bodies are in."""
    boundary = "trickle"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n".encode()
            + files["png16"].read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool, \
            httpx.Client(base_url=service.url, timeout=30.0) as http:
        assert upload(http, files["png16"], scale=4).status_code == 200  # warm
        slow = [pool.submit(_trickle, service.port, body, 10.0, boundary) for _ in range(4)]
        time.sleep(1.0)
        latencies = []
        while not all(future.done() for future in slow) and len(latencies) < 12:
            started = time.monotonic()
            assert upload(http, files["png16"], scale=4).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.5)
        assert [future.result() for future in slow] == [200] * 4
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def test_read_and_compute_deadlines_give_408_and_503(registry: dict[str, Any], files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """serving.read_timeout_s ends an upload that stalls (408); serving.compute_timeout_s answers a
    computation that runs past it (503); the worker goes on serving."""
    params = params_file(tmp_path, read_timeout_s=2.0, compute_timeout_s=0.3)
    with ServiceProcess(env={"MLFLOW_TRACKING_URI": registry["uri"], "MEDSR_PARAMS": str(params)},
                        log_path=tmp_path / "service.log", device="cpu", startup_timeout=STARTUP_S) as deadlines, \
            httpx.Client(base_url=deadlines.url, timeout=60.0) as http:
        head = (b"POST /upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\nConnection: close\r\n\r\n")
        started = time.monotonic()
        status, body = _raw_http(deadlines.port, head, [b'--b\r\nContent-Disposition: form-data; name="file"; '
                                                         b'filename="a.png"\r\n\r\n\x89PNG'])
        assert status == 408 and "read_timeout_s" in body["error"], body
        assert time.monotonic() - started < 10.0
        started = time.monotonic()
        assert_error(upload(http, _large_png(tmp_path), scale=4), 503, "compute_timeout_s")
        assert time.monotonic() - started < 10.0
        assert http.post("/upscale_array", json={"images": [{"image": [[0.25, 0.5], [0.75, 1.0]]}]}).status_code == 200
        assert http.get("/readyz").status_code == 200


def test_sigterm_with_a_stuck_request_exits_within_the_grace_period(registry: dict[str, Any], tmp_path: Path) -> None:
    """An upload that stops halfway holds its request forever; SIGTERM must still end the server
    (every process of it) within serving.shutdown_grace_s, plus a margin for the exit itself."""
    import psutil

    grace = 3.0
    params = params_file(tmp_path, shutdown_grace_s=grace)
    service = ServiceProcess(env={"MLFLOW_TRACKING_URI": registry["uri"], "MEDSR_PARAMS": str(params)},
                             log_path=tmp_path / "service.log", device="cpu", startup_timeout=STARTUP_S).start()
    try:
        processes = [psutil.Process(pid) for pid in service.server_pids()]
        stuck = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + b"\x89PNG" * 100
        stuck.sendall(b"POST /upscale HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 1000000\r\n\r\n" + head)
        time.sleep(1.0)  # the request is in the app, waiting for the rest of its body
        assert service.process is not None
        started = time.monotonic()
        os.killpg(service.process.pid, signal.SIGTERM)
        _gone, alive = psutil.wait_procs(processes, timeout=grace + 7.0)
        elapsed = time.monotonic() - started
        assert not alive, f"still running {elapsed:.1f} s after SIGTERM: {[p.pid for p in alive]}"
        assert elapsed < grace + 7.0
        stuck.close()
    finally:
        service.stop()
    assert "shutdown" in (tmp_path / "service.log").read_text(errors="replace").lower()


# ---------------------------------------------------------------------------- Python client


def test_bentoml_python_client(service: ServiceProcess, files: dict[str, Path]) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(service.url, timeout=120) as medsr:
        result = medsr.upscale(file=files["png16"], scale=2)
        with Image.open(result) as image:
            assert image.size == (80, 96)
        arrays = medsr.upscale_array(images=[{"image": [[0.2, 0.4], [0.6, 0.8]], "scale": 4}])
        assert arrays[0]["shape"] == [8, 8] and "consistency_psnr" in arrays[0]
        with pytest.raises(bentoml.exceptions.BentoMLException, match="scale 3"):
            medsr.upscale(file=files["png16"], scale=3)


# -------------------------------------------------------------------------------- packaging


def test_package_builds_a_bento_that_serves_the_champion(registry: dict[str, Any], files: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """`medsr package`: champions imported from the registry into a Bento, served without MLflow."""
    env = {**os.environ, **QUIET_ENV, "BENTOML_HOME": str(tmp_path / "bentoml"), "MLFLOW_TRACKING_URI": registry["uri"],
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    built = subprocess.run([sys.executable, "-c", "import json; from serving.packaging import package_bento; "
                            "tag, models = package_bento(); print(json.dumps([tag, models]))"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    bento_tag, models = json.loads(built.stdout.strip().splitlines()[-1])
    assert bento_tag.startswith("medsr:") and set(models) == {"4", "2"}
    # The registry is out of reach now: the Bento must carry its models.
    with ServiceProcess(target=bento_tag, cwd=tmp_path, log_path=tmp_path / "bento.log", device="cpu",
                        env={"BENTOML_HOME": env["BENTOML_HOME"],
                             "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty' / 'none.db'}"}) as bento:
        with httpx.Client(base_url=bento.url, timeout=120) as http:
            info = http.get("/info").json()
            assert info["model_source"] == "bentoml" and info["models"]["4"]["version"] == "1"
            response = upload(http, files["ct"], scale=4)
            assert response.status_code == 200 and response.headers["x-medsr-model-version"] == "1"
            assert_error(upload(http, files["ct"], scale=4, model_version=2), 422, "not in this bento")


# ------------------------------------------------------------------------------------- logs


WRONG_VR_ID = "QX7731-Hallorann"


def wrong_vr_patient_id(folder: Path) -> Path:
    """The CT sample with its PatientID (LO) declared IS: pydicom warns `Invalid value for VR IS: '<id>'`."""
    ct = pydicom.dcmread(sample_file("pydicom", "CT_small.dcm"))
    ct.PatientID = WRONG_VR_ID
    path = folder / "wrong_vr.dcm"
    ct.save_as(path)
    raw = path.read_bytes()
    value = WRONG_VR_ID.encode()  # 16 characters: no padding
    element = b"\x10\x00\x20\x00LO" + len(value).to_bytes(2, "little") + value
    assert raw.count(element) == 1
    path.write_bytes(raw.replace(element, b"\x10\x00\x20\x00IS" + element[6:]))
    return path


def test_logs_hold_no_patient_identifiers(service: ServiceProcess, client: httpx.Client, files: dict[str, Path],
                                          tmp_path: Path) -> None:
    """Runs last: by now the log holds every request above, many with the identifying file; then
    the wrong-VR PatientID file, whose warnings must keep the element's name and drop its value."""
    assert upload(client, files["four_frames"]).status_code == 422
    assert upload(client, wrong_vr_patient_id(tmp_path), scale=4).status_code == 200
    time.sleep(0.5)  # the worker's log lines reach the file
    log_path = service.log_path
    assert log_path is not None
    shutil.copy(log_path, log_path.with_suffix(".copy"))  # the file is still being written
    text = log_path.with_suffix(".copy").read_text(errors="replace")
    assert "endpoint=/upscale" in text  # the log is the right one, and it logs requests
    assert "Invalid value for VR IS" in text  # the warning is logged, without the value
    for secret in ("Janet", "Doe", PATIENT_ID, "SECRET", SECRET_FILE_NAME, *WRONG_VR_ID.split("-")):
        assert secret not in text, f"{secret!r} found in the service log"
