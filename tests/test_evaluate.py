"""`medsr evaluate`: a user's own folder of HR files, model vs bicubic on both tracks, and the same
numbers as the benchmark when it is given the benchmark's own test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 2


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    field = gaussian_filter(rng.random((h, w)), 3.0)
    field = (field - field.min()) / (field.max() - field.min())
    return (0.1 + 0.8 * field).astype(np.float32)[None]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Pairs written by the real degrade code, an ESPCN trained a few steps, and the benchmark's report."""
    from medsr.benchmark import benchmark
    from medsr.consistency import ConsistencySettings
    from medsr.data.pairing import build_pair_sets
    from medsr.training import TrainConfig
    from medsr.training.trainer import train_generator

    root = tmp_path_factory.mktemp("evaluate")
    params = load_params(REPO_ROOT / "params.yaml")
    params["degrade"]["scales"] = [SCALE]
    rng = np.random.default_rng(5)
    rows = []
    for i, (modality, split) in enumerate([(m, s) for m in ("xray", "mri") for s in ("train", "train", "val", "test", "test")]):
        name = f"img{i}.npy"
        np.save(root / name, _image(rng, 64 + 8 * (i % 3), 72))
        rows.append({"id": f"{modality}-{i:04d}", "modality": modality, "array": name, "split": split})
    build_pair_sets(pd.DataFrame(rows), root, root / "pairs", params["degrade"])
    config = TrainConfig(model="espcn", scale=SCALE, pairs_root=str(root / "pairs"), out_dir=str(root / "models/espcn/x2"),
                         steps=12, batch_size=4, lr_patch=16, val_every=6, checkpoint_every=6, num_workers=0, quiet=True)
    train_generator(config)
    consistency = ConsistencySettings.from_params(params["consistency"])
    report = benchmark(["espcn"], [SCALE], root / "pairs", root / "models", consistency=consistency, latency_side=32)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "report": report, "checkpoint": root / "models/espcn/x2/best.pt"}


def _evaluate(*args: str) -> object:
    from medsr.cli import app

    return CliRunner().invoke(app, ["evaluate", *args], env={"COLUMNS": "200"})


def test_evaluate_on_the_test_images_gives_the_benchmarks_numbers(project: dict[str, object], tmp_path: Path) -> None:
    from medsr.data.pairs import PairSet

    root = project["root"]
    for modality in ("xray", "mri"):
        (tmp_path / "images" / modality).mkdir(parents=True)
    pairs = PairSet(root / "pairs" / "test" / f"x{SCALE}" / "clean")
    for i, pair in enumerate(pairs.pairs):
        stored = np.round(pairs.hr(i)[0] * 65535).astype(np.uint16)  # 16-bit PNG: the loader's window is 0..65535
        Image.fromarray(stored).save(tmp_path / "images" / pair["modality"] / f"{pair['id']}.png")
    out = tmp_path / "eval.json"
    result = _evaluate(str(tmp_path / "images"), "--model", str(project["checkpoint"]), "--scale", str(SCALE),
                       "--json", str(out), "--params", str(root / "params.yaml"))
    assert result.exit_code == 0, result.output
    assert "clean" in result.output and "realistic" in result.output
    report = json.loads(out.read_text())
    assert len(report["per_image"]) == 2 * len(pairs)
    bench = {(r["track"], r["modality"]): r for r in project["report"]["results"] if r["model"] == "espcn"}
    mine = {(r["track"], r["modality"]): r for r in report["summary"]}
    assert set(mine) == set(bench)
    for cell, row in mine.items():
        # 16-bit quantisation of the HR image is the only difference: far below 0.01 dB.
        assert row["psnr"] == pytest.approx(bench[cell]["psnr"], abs=0.01), cell
        assert row["bicubic_psnr"] == pytest.approx(bench[cell]["bicubic_psnr"], abs=0.01), cell
        assert row["ssim"] == pytest.approx(bench[cell]["ssim"], abs=1e-3), cell
        assert row["images"] == bench[cell]["images"]


def test_evaluate_reads_dicom_and_png_and_names_what_it_skips(project: dict[str, object], tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(9)
    hu = (_image(rng, 96, 96)[0] * 1400 - 1000).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 96, 96, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 40, 400
    ds.PixelData = hu.tobytes()
    ds.save_as(folder / "slice.dcm", enforce_file_format=True)
    Image.fromarray((_image(rng, 80, 80)[0] * 255).astype(np.uint8)).save(folder / "chest.png")
    (folder / "broken.dcm").write_bytes(b"DICM not really")
    out = tmp_path / "eval.json"
    result = _evaluate(str(folder), "--model", str(project["checkpoint"]), "--scale", str(SCALE), "--modality", "xray",
                       "--json", str(out), "--params", str(project["root"] / "params.yaml"))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {r["file"] for r in report["per_image"]} == {"slice.dcm", "chest.png"}
    assert any(line.startswith("broken.dcm:") for line in report["skipped"])
    for row in report["per_image"]:
        assert np.isfinite(row["gain_db"]) and row["track"] in ("clean", "realistic")


def test_evaluate_refuses_bad_requests_with_one_line(project: dict[str, object], tmp_path: Path) -> None:
    params = str(project["root"] / "params.yaml")
    empty = _evaluate(str(tmp_path), "--model", str(project["checkpoint"]), "--scale", "2", "--params", params)
    assert empty.exit_code == 1 and "no DICOM, NIfTI, PNG or TIFF files" in empty.output
    wrong_scale = _evaluate(str(tmp_path), "--model", str(project["checkpoint"]), "--scale", "4", "--params", params)
    assert wrong_scale.exit_code == 1 and "pass --scale 2" in wrong_scale.output
    unknown = _evaluate(str(tmp_path), "--model", "nothing-here", "--scale", "2", "--params", params)
    assert unknown.exit_code == 1 and "models:/medsr-x4@champion" in unknown.output


@pytest.mark.parametrize("correlation", [0.0, 1.0])
def test_noisy_reference_probe_puts_seeded_noise_in_the_hr_and_rebuilds_each_track(correlation: float) -> None:
    from medsr import degradations as deg
    from medsr.data.pairing import track_lr
    from medsr.evaluation import HeldOutImage, with_noisy_reference

    degrade = load_params()["degrade"]
    hr = np.full((1, 128, 128), 0.5, np.float32)
    images = [HeldOutImage(key=key, modality="xray", source="f", track=track, hr=hr,
                           lr=track_lr(hr, SCALE, track, modality="xray", key=key, degrade_params=degrade))
              for key in ("a", "b") for track in ("clean", "realistic")]
    probed = with_noisy_reference(images, 0.006, correlation, SCALE, degrade)
    again = with_noisy_reference(images, 0.006, correlation, SCALE, degrade)
    for image, out, out_again in zip(images, probed, again, strict=True):
        assert (out.key, out.track, out.modality) == (image.key, image.track, image.modality)
        assert np.array_equal(out.hr, out_again.hr) and np.array_equal(out.lr, out_again.lr)  # seeded
        noise = (out.hr - hr)[0]
        assert noise.std() == pytest.approx(0.006, rel=0.02)
        neighbour = np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]
        assert (neighbour > 0.5) if correlation else (abs(neighbour) < 0.05)
        # The LR comes from the noisy HR on the image's own track (the realistic track's own seeded noise on top).
        assert np.array_equal(out.lr, track_lr(out.hr, SCALE, out.track, modality="xray", key=out.key,
                                               degrade_params=degrade))
    assert np.array_equal(probed[0].lr, deg.degrade_bicubic(probed[0].hr, SCALE))
    assert np.abs(probed[0].hr - probed[2].hr).max() > 0.01  # each image its own noise


def test_benchmark_scores_the_consistency_baseline_and_each_networks_own_gain(project: dict[str, object]) -> None:
    from medsr.benchmark import held_out_images
    from medsr.consistency import ConsistencySettings, refine
    from medsr.evaluation import evaluate_images, summarize
    from medsr.models import build_generator
    from medsr.inference import predict_image

    report = project["report"]
    root = project["root"]
    consistency = ConsistencySettings.from_params(load_params(REPO_ROOT / "params.yaml")["consistency"])
    for rows in (report["results"], report["validation"]):
        models = {r["model"] for r in rows}
        assert models == {"bicubic", "bicubic+consistency", "espcn"}
        cells = {(r["track"], r["modality"]) for r in rows}
        for model in models:
            assert {(r["track"], r["modality"]) for r in rows if r["model"] == model} == cells, model
    # The baseline is bicubic followed by the served step, scored like any model.
    bicubic = build_generator("bicubic", SCALE)
    records = []
    for track in ("clean", "realistic"):
        records += evaluate_images(
            lambda lr: {"bicubic": predict_image(bicubic, lr), "b+c": refine(predict_image(bicubic, lr), lr, SCALE,
                                                                              consistency)},
            held_out_images(root / "pairs", "test", SCALE, track, {}), SCALE)
    expected = {(r["track"], r["modality"]): r["gain_db"] for r in summarize(records) if r["model"] == "b+c"}
    baseline = {(r["track"], r["modality"]): r for r in report["results"] if r["model"] == "bicubic+consistency"}
    assert any(g != 0 for g in expected.values())  # the step moves these (smooth) images, if only slightly
    for cell, gain in expected.items():
        assert baseline[cell]["gain_db"] == pytest.approx(gain, abs=1e-4), cell
        assert baseline[cell]["network_gain_db"] == 0.0
    # Each model row: the system's gain, the network's own (the ablation row), and the baseline's beside them.
    ablation = {(r["split"], r["track"], r["modality"]): r for r in report["ablation"] if r["model"] == "espcn"}
    for split, rows in (("test", report["results"]), ("val", report["validation"])):
        for r in (r for r in rows if r["model"] == "espcn"):
            alone = ablation[(split, r["track"], r["modality"])]
            assert r["network_gain_db"] == alone["gain_db"] and r["consistency"] and not alone["consistency"]
            assert r["baseline_gain_db"] == baseline_row_gain(rows, r)
    assert any(r["gain_db"] != r["network_gain_db"] for r in report["results"] if r["model"] == "espcn")


def baseline_row_gain(rows: list[dict[str, object]], row: dict[str, object]) -> object:
    return next(r["gain_db"] for r in rows if r["model"] == "bicubic+consistency"
                and (r["track"], r["modality"]) == (row["track"], row["modality"]))
