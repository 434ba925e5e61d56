"""The model registry against a real MLflow store (embedded SQLite in a temporary folder): selection,
registration with tags and model card, champion/challenger decisions on the same test split,
manual promotion, review, and the clear messages for an empty registry, a deleted version and an
unreachable tracking server."""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALE = 2
NAME = "medsr-x2"
MODALITIES = ("ct", "mri", "xray")
TRACKS = ("clean", "realistic")
PAIRS = Path("data/pairs")
TRAIN_DIR = Path("metrics/train")


@dataclass(frozen=True)
class LoggedRun:
    run_id: str
    model_uri: str


@dataclass(frozen=True)
class Store:
    """A folder with mlflow.db (three logged generators), mlartifacts/ and data/pairs/test/x2/<track>."""

    root: Path
    runs: tuple[LoggedRun, ...]
    bicubic: dict[str, tuple[float, float]]  # real bicubic (PSNR, SSIM) per cell "<track>/<modality>" on the test pairs


def _write_test_pairs(pairs_root: Path) -> None:
    import torch
    import torch.nn.functional as F

    from medsr.data.pairs import PairItem, write_pairs

    rng = np.random.default_rng(0)
    items = []
    for modality in MODALITIES:
        for i in range(2):
            hr = np.clip(gaussian_filter(rng.random((32, 32)), 2.0) * 3 - 1, 0, 1).astype(np.float32)[None]
            lr = F.interpolate(torch.from_numpy(hr)[None], scale_factor=1 / SCALE, mode="bicubic", antialias=True)
            items.append(PairItem(f"{modality}-{i}", modality, hr, lr.clamp(0, 1)[0].numpy()))
    for track in TRACKS:
        noisy = [PairItem(i.id, i.modality, i.hr, np.clip(i.lr + (0.01 if track == "realistic" else 0.0), 0, 1)
                          .astype(np.float32)) for i in items]
        write_pairs(pairs_root / "test" / f"x{SCALE}" / track, noisy, scale=SCALE)


def _log_generator_run(seed: int) -> LoggedRun:
    """A tracked 'training' run that logs an ESPCN generator (random weights per seed) as train_tracked does."""
    import torch

    from medsr import tracking
    from medsr.models import build_generator

    torch.manual_seed(seed)
    generator = build_generator("espcn", SCALE)
    example = np.random.default_rng(seed).random((2, 1, 16, 16)).astype(np.float32)
    with tracking.training_run(f"espcn-x{SCALE}", {"train": {"model": "espcn", "seed": seed}},
                               {"model": "espcn", "scale": str(SCALE), "profile": "test"}) as run:
        uri = tracking.log_generator(generator, example, {"model": "espcn", "scale": SCALE, "options": {}})
    return LoggedRun(run.info.run_id, uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    from medsr.benchmark import held_out_images
    from medsr.evaluation import evaluate_images, summarize
    from medsr.models import build_generator
    from medsr.inference import predict_image

    root = tmp_path_factory.mktemp("registry-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        _write_test_pairs(root / PAIRS)
        runs = tuple(_log_generator_run(seed) for seed in (1, 2, 3))
        bicubic = build_generator("bicubic", SCALE)
        records = [r for t in TRACKS for r in evaluate_images(lambda lr: {"bicubic": predict_image(bicubic, lr)},
                                                              held_out_images(root / PAIRS, "test", SCALE, t, {}), SCALE)]
    rows = summarize(records)
    return Store(root, runs, {f"{r['track']}/{r['modality']}": (r["psnr"], r["ssim"]) for r in rows if r["modality"] != "all"})


@pytest.fixture
def workspace(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the store's database (logged models, no registry yet) as the working directory."""
    shutil.copy(store.root / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(store.root / PAIRS, tmp_path / PAIRS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MEDSR_USER", "alice")
    monkeypatch.setenv("COLUMNS", "200")  # tables as wide as a terminal, not rich's 80 for a pipe
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params()))  # what the CLI reads
    return tmp_path


def params(**registry: Any) -> dict[str, Any]:
    """The project's registry settings (as params.yaml has them) at one scale, with overrides."""
    loaded = load_params(REPO_ROOT / "params.yaml")
    return {"degrade": {"scales": [SCALE], "tracks": list(TRACKS)}, "consistency": loaded["consistency"],
            "registry": {**loaded["registry"], **registry}}


def report(store: Store, gains: dict[str, dict[str, tuple[float, float]]], baseline_gain: float = 0.0) -> dict[str, Any]:
    """A benchmark report: per model and modality (test gain dB, validation gain dB) over the real bicubic;
    the bicubic+consistency baseline gains ``baseline_gain`` on every cell."""
    rows = []
    references = {"bicubic": {m: (0.0, 0.0) for m in MODALITIES},
                  "bicubic+consistency": {m: (baseline_gain, baseline_gain) for m in MODALITIES}}
    for model, per_modality in {**references, **gains}.items():
        for key, (test_gain, val_gain) in per_modality.items():
            # A gain given per modality holds on both tracks; "track/modality" keys set one cell.
            for track in ([key.split("/")[0]] if "/" in key else TRACKS):
                modality = key.split("/")[-1]
                bicubic_psnr, bicubic_ssim = store.bicubic[f"{track}/{modality}"]
                rows.append({"model": model, "scale": SCALE, "track": track, "modality": modality, "images": 2,
                             "psnr": bicubic_psnr + test_gain, "ssim": bicubic_ssim + test_gain / 100,
                             "bicubic_psnr": bicubic_psnr, "bicubic_ssim": bicubic_ssim, "gain_db": test_gain,
                             "ssim_gain": test_gain / 100, "val_gain_db": val_gain, "val_ssim_gain": val_gain / 100,
                             "network_gain_db": test_gain, "val_network_gain_db": val_gain,
                             "val_baseline_gain_db": baseline_gain, "val_baseline_ssim_gain": baseline_gain / 100,
                             "val_images": 2})
    models = {m: {f"x{SCALE}": {"params": 1234, "macs_per_output_mpixel": 5.0e8, "cpu_latency_ms_256": 3.5,
                                "trained_steps": 12, "best_val_psnr": 31.0, "feature_loss": "none"}} for m in gains}
    images = {"test": {t: {m: [f"{m}-0", f"{m}-1"] for m in MODALITIES} for t in TRACKS}}
    return {"definition": "test definition", "results": rows, "models": models, "images": {f"x{SCALE}": images}}


def uniform(test_gain: float, val_gain: float = 0.1) -> dict[str, tuple[float, float]]:
    return {m: (test_gain, val_gain) for m in MODALITIES}


def write_train_metrics(model: str, run: LoggedRun) -> None:
    TRAIN_DIR.mkdir(parents=True, exist_ok=True)
    (TRAIN_DIR / f"{model}.json").write_text(json.dumps(
        {"model": model, "scales": {f"x{SCALE}": {"run_id": run.run_id, "model_uri": run.model_uri}}}))


def register(store: Store, gains: dict[str, dict[str, tuple[float, float]]], runs: dict[str, LoggedRun],
             data_version: str | None = None, **registry: Any) -> dict[str, Any]:
    from medsr import tracking
    from medsr.registry import register_best

    for model, run in runs.items():
        write_train_metrics(model, run)
    record = register_best(params(**registry), report(store, gains), train_dir=TRAIN_DIR, pairs_root=PAIRS,
                           data_version=data_version or tracking.data_version(PAIRS))
    return record["decisions"][f"x{SCALE}"]


def client() -> Any:
    from mlflow import MlflowClient

    from medsr import tracking

    return MlflowClient(tracking_uri=tracking.tracking_uri())


def cli(*args: str) -> Any:
    from medsr.registry_cli import registry_app

    return CliRunner().invoke(registry_app, list(args))


def test_best_eligible_model_is_registered_as_champion_with_tags_card_and_decision_run(store: Store, workspace: Path) -> None:
    # srgan has the higher mean validation gain but is worse than bicubic on MRI: not eligible.
    gains = {"espcn": {"ct": (0.1, 0.1), "mri": (0.2, 0.1), "xray": (0.3, 0.2)},
             "srgan": {"ct": (0.9, 0.9), "mri": (-0.2, -0.1), "xray": (0.9, 0.9)}}
    decision = register(store, gains, {"espcn": store.runs[0], "srgan": store.runs[1]})

    assert decision["action"] == "promoted" and decision["model"] == "espcn" and decision["version"] == "1"
    assert "no champion yet" in decision["reason"]
    assert decision["selection"].startswith("espcn") and "1 of 2 that beat bicubic+consistency" in decision["selection"]
    mlflow_client = client()
    champion = mlflow_client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and champion.run_id == store.runs[0].run_id
    tags = champion.tags
    assert tags["model"] == "espcn" and tags["scale"] == "2" and len(tags["params_hash"]) == 16
    assert tags["git_commit"] and tags["trained_at"].startswith("20") and tags["data_version"].startswith("index:")
    assert float(tags["test.clean/xray.gain_db"]) == pytest.approx(0.3)
    assert float(tags["val.realistic/mri.gain_db"]) == pytest.approx(0.1)
    assert float(tags["test.realistic/ct.psnr"]) == pytest.approx(store.bicubic["realistic/ct"][0] + 0.1, abs=1e-4)
    assert float(tags["test.mean_gain_db"]) == pytest.approx(0.2)
    assert tags["params"] == "1234" and tags["cpu_latency_ms_256"] == "3.5" and tags["decision"] == "promoted"
    assert champion.description.startswith("# medsr-x2 version 1: espcn x2") and "| clean/xray |" in champion.description

    run = mlflow_client.get_run(tags["decision_run_id"])
    assert run.data.tags["decision"] == "promoted" and run.data.tags["registered_model"] == NAME
    # The decision names the images behind it.
    assert decision["images"]["test"]["clean"]["xray"] == ["xray-0", "xray-1"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "decision.json"} <= artifacts
    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    assert experiment.name == "medsr-registry"
    # Aliases, never the deprecated stages.
    assert champion.current_stage in (None, "None")


def test_worse_challenger_is_kept_and_better_one_promoted_with_numbers_recorded(store: Store, workspace: Path) -> None:
    first = register(store, {"espcn": uniform(0.2)}, {"espcn": store.runs[0]})
    assert first["action"] == "promoted"

    # +0.02 dB over the champion is below registry.min_gain_db (0.05): kept as challenger.
    kept = register(store, {"espcn": uniform(0.22)}, {"espcn": store.runs[1]})
    assert kept["action"] == "kept" and kept["version"] == "2" and kept["champion_after"] == "1"
    assert kept["delta_db"] == pytest.approx(0.02, abs=1e-6)
    assert kept["challenger"]["mean_test_gain_db"] == pytest.approx(0.22)
    assert kept["champion"]["mean_test_gain_db"] == pytest.approx(0.2)
    assert kept["champion"]["source"] == "tags" and "same data version" in kept["compared_on"]
    mlflow_client = client()
    assert str(mlflow_client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(mlflow_client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    run = mlflow_client.get_run(kept["decision_run_id"])
    assert run.data.tags["decision"] == "kept"
    assert run.data.metrics["delta_db"] == pytest.approx(0.02, abs=1e-6)
    assert run.data.metrics["champion_mean_test_gain_db"] == pytest.approx(0.2)

    promoted = register(store, {"espcn": uniform(0.5)}, {"espcn": store.runs[2]})
    assert promoted["action"] == "promoted" and promoted["champion_after"] == "3"
    assert promoted["delta_db"] == pytest.approx(0.3)
    assert str(mlflow_client.get_model_version_by_alias(NAME, "champion").version) == "3"


def test_registering_the_same_run_again_adds_no_version(store: Store, workspace: Path) -> None:
    register(store, {"espcn": uniform(0.2)}, {"espcn": store.runs[0]})
    again = register(store, {"espcn": uniform(0.2)}, {"espcn": store.runs[0]})
    assert again["action"] == "unchanged" and again["version"] == "1" and not again["newly_registered"]
    assert len(client().search_model_versions(f"name='{NAME}'")) == 1


def test_champion_scored_on_other_data_is_re_evaluated_on_the_current_test_pairs(store: Store, workspace: Path) -> None:
    from medsr.benchmark import score_generator
    from medsr.consistency import ConsistencySettings
    from medsr.tracking import load_logged_generator

    register(store, {"espcn": uniform(5.0)}, {"espcn": store.runs[0]}, data_version="dvc:old-data")
    decision = register(store, {"espcn": uniform(0.1)}, {"espcn": store.runs[1]}, data_version="dvc:new-data")

    # The champion's +5 dB tags were for other data: it was scored again, on the new test pairs.
    assert decision["champion"]["source"] == "re-evaluated"
    assert "re-evaluated" in decision["compared_on"] and "dvc:old-data" in decision["compared_on"]
    generator, _ = load_logged_generator(f"models:/{NAME}/1")
    consistency = ConsistencySettings.from_params(load_params(REPO_ROOT / "params.yaml")["consistency"])
    rows = score_generator(generator, SCALE, PAIRS, tracks=TRACKS, consistency=consistency)
    expected = {f"{r['track']}/{r['modality']}": r["psnr"] for r in rows if r["modality"] != "all"}
    assert sorted(expected) == sorted(store.bicubic)
    for cell, psnr in expected.items():
        measured = decision["champion"]["per_modality"][cell]
        assert measured["psnr"] == pytest.approx(psnr, abs=1e-3)
        assert measured["gain_db"] == pytest.approx(psnr - store.bicubic[cell][0], abs=1e-3)
    champion_mean = np.mean([psnr - store.bicubic[cell][0] for cell, psnr in expected.items()])
    assert decision["delta_db"] == pytest.approx(0.1 - champion_mean, abs=1e-3)
    assert decision["action"] == ("promoted" if 0.1 - champion_mean >= 0.05 else "kept")


def test_no_model_better_than_bicubic_everywhere_registers_nothing(store: Store, workspace: Path) -> None:
    # Better than bicubic everywhere but on the realistic MRI cell of the validation split: not eligible.
    gains = {"ct": (0.3, 0.3), "clean/mri": (0.1, 0.2), "realistic/mri": (0.1, -0.05), "xray": (0.2, 0.2)}
    decision = register(store, {"espcn": gains}, {"espcn": store.runs[0]})
    assert decision["action"] == "none" and decision["version"] is None
    assert "espcn (realistic/mri -0.05 dB vs bicubic+consistency)" in decision["reason"]
    assert client().search_model_versions(f"name='{NAME}'") == []
    assert client().get_run(decision["decision_run_id"]).data.tags["decision"] == "none"
    # The tolerance is a parameter: within 0.1 dB of bicubic counts as not worse.
    tolerated = register(store, {"espcn": gains}, {"espcn": store.runs[0]}, max_modality_loss_db=0.1)
    assert tolerated["action"] == "promoted"


def test_promote_refuses_a_worse_model_unless_forced_with_a_reason(store: Store, workspace: Path) -> None:
    register(store, {"espcn": uniform(0.3)}, {"espcn": store.runs[0]})
    register(store, {"espcn": uniform(0.1)}, {"espcn": store.runs[1]})

    refused = cli("promote", "2", "--scale", "2")
    assert refused.exit_code == 1 and "refusing to promote medsr-x2 v2" in refused.output and "--force" in refused.output
    no_reason = cli("promote", "medsr-x2/2", "--force")
    assert no_reason.exit_code == 1 and "--reason" in no_reason.output
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == "1"

    forced = cli("promote", "medsr-x2/2", "--force", "--reason", "v1 misbehaves on the new scanner")
    assert forced.exit_code == 0, forced.output
    version = client().get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == "2"
    assert version.tags["promoted_by"] == "alice" and version.tags["promotion_forced"] == "true"
    assert version.tags["promotion_reason"] == "v1 misbehaves on the new scanner"
    assert version.tags["promoted_over_version"] == "1"

    # Back to v1: better than the champion, so no --force needed.
    assert cli("promote", "1", "--scale", "2").exit_code == 0
    assert str(client().get_model_version_by_alias(NAME, "champion").version) == "1"


def test_review_shows_champion_and_challengers_side_by_side(store: Store, workspace: Path) -> None:
    register(store, {"espcn": uniform(0.3)}, {"espcn": store.runs[0]})
    register(store, {"espcn": uniform(0.1)}, {"espcn": store.runs[1]})

    shown = cli("review")
    assert shown.exit_code == 0, shown.output
    for text in ("v1 @champion", "v2 @challenger", "xray PSNR / SSIM / gain", "+0.30", "+0.10", "1,234", "3.5",
                 "data version", "trained"):
        assert text in shown.output, text
    as_json = json.loads(cli("review", "--json").output)
    versions = as_json[NAME]["versions"]
    assert [v["version"] for v in versions] == ["1", "2"] and versions[0]["aliases"] == ["champion"]
    champions = cli("champions")
    assert champions.exit_code == 0 and "medsr-x2 champion: v1 espcn" in champions.output


def test_clear_messages_for_no_champion_a_deleted_version_and_an_unreachable_server(
        store: Store, workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = cli("review")
    assert empty.exit_code == 0 and "medsr-x2 has no versions yet" in empty.output
    assert "medsr-x2: no champion yet" in cli("champions").output
    nothing = cli("promote", "1", "--scale", "2")
    assert nothing.exit_code == 1 and "medsr-x2 has no versions yet" in nothing.output

    register(store, {"espcn": uniform(0.3)}, {"espcn": store.runs[0]})
    register(store, {"espcn": uniform(0.1)}, {"espcn": store.runs[1]})
    client().delete_model_version(NAME, "1")
    deleted = cli("promote", "1", "--scale", "2")
    assert deleted.exit_code == 1
    assert "medsr-x2 has no version 1 (deleted or never registered); existing versions: 2" in deleted.output
    assert "has no champion yet" in cli("review").output

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    unreachable = cli("review")
    assert time.perf_counter() - started < 15  # not MLflow's minutes of retries
    assert unreachable.exit_code == 1
    lines = [line for line in unreachable.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"http://127.0.0.1:{port} is unreachable" in lines[0], unreachable.output


def test_review_scores_each_version_on_the_users_own_folder(store: Store, workspace: Path) -> None:
    from PIL import Image

    register(store, {"espcn": uniform(0.3)}, {"espcn": store.runs[0]})
    register(store, {"espcn": uniform(0.1)}, {"espcn": store.runs[1]})
    folder = workspace / "mine" / "xray"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    Image.fromarray((gaussian_filter(rng.random((64, 64)), 2.0) * 255 * 3).clip(0, 255).astype(np.uint8)).save(
        folder / "chest.png")
    params_file = workspace / "params.yaml"
    full = load_params(REPO_ROOT / "params.yaml")
    params_file.write_text(yaml.safe_dump({**params(), "degrade": {**full["degrade"], "scales": [SCALE]},
                                           "data": full["data"]}))
    shown = cli("review", "--evaluate", str(workspace / "mine"))
    assert shown.exit_code == 0, shown.output
    for text in ("models:/medsr-x2/1 x2 vs bicubic", "models:/medsr-x2/2 x2 vs bicubic", "chest", "realistic"):
        assert text in shown.output, text
