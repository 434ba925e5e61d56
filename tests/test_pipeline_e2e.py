"""The whole DVC pipeline on a copy of the repository, with the `smoke` training profile:
data stages, six trainings tracked in MLflow, the benchmark; then no-op and partial reruns,
and a killed training that `dvc repro` resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_SKIP = {".venv", ".git", "data", "reports", "mlruns", "mlartifacts", "mlflow.db", "models", "benchmarks", "plots"}
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="")


def dvc(args: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def copy_repo(dest: Path, profile: str = "smoke") -> Path:
    def skip(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in {"__pycache__", ".pytest_cache"}}
        return skipped | (TOP_LEVEL_SKIP & set(names) if Path(folder) == REPO_ROOT else set())

    shutil.copytree(REPO_ROOT, dest, ignore=skip)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["profile"] = profile
    params["benchmark"].update(latency_side=64, max_images_per_modality=2)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(["config", "--local", "core.site_cache_dir", str(dest.parent / "dvc-site")], dest)
    return dest


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    first = dvc(["repro"], work)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return work


@pytest.mark.slow
def test_dag_has_every_stage(reproduced: Path) -> None:
    dag = dvc(["dag"], reproduced)
    assert dag.returncode == 0, dag.stderr
    for stage in ("download", "validate", "split", "degrade", "benchmark", "train@espcn", "train@blimsr", "train@residual_cnn"):
        assert stage in dag.stdout


@pytest.mark.slow
def test_repro_writes_data_models_and_benchmark(reproduced: Path) -> None:
    assert (reproduced / "data/pairs/test/x4/standard/index.json").is_file()
    assert (reproduced / "reports/validation.html").is_file()
    report = json.loads((reproduced / "metrics/benchmark.json").read_text())
    models = {r["model"] for r in report["results"]}
    assert models == {"bicubic", "espcn", "srgan", "swift_srgan", "brainsr", "blimsr", "residual_cnn"}
    for row in report["results"]:
        assert row["modality"] in {"xray", "ct", "mri", "all"} and row["images"] > 0
        assert 10.0 < row["psnr"] < 100.0 and 0.0 < row["ssim"] <= 1.0
    assert report["models"]["espcn"]["x4"]["params"] == 61_680
    for name in ("espcn", "blimsr"):
        train = json.loads((reproduced / f"metrics/train/{name}.json").read_text())
        assert train["scales"]["x2"]["model_uri"].startswith("models:/")
    assert (reproduced / "plots/psnr.csv").is_file() and (reproduced / "plots/crops_x4.png").stat().st_size > 1000
    assert (reproduced / "mlflow.db").is_file()


@pytest.mark.slow
def test_second_repro_is_noop_and_param_changes_rerun_only_their_stages(reproduced: Path) -> None:
    second = dvc(["repro"], reproduced)
    assert second.returncode == 0, second.stderr
    assert ran_stages(second.stdout) == [], second.stdout

    params_path = reproduced / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["train"]["models"]["espcn"]["lr_generator"] = 0.0003
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        # A dry run lists the stages whose own deps changed (downstream ones follow once outputs differ):
        # only this model retrains, none of the other five.
        assert ran_stages(dvc(["repro", "--dry"], reproduced).stdout) == ["train@espcn"]

        params = yaml.safe_load(original)
        params["degrade"]["blur_sigma"] = 0.7
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        assert ran_stages(dvc(["repro", "--dry"], reproduced).stdout) == ["degrade"]
    finally:
        params_path.write_text(original)


@pytest.mark.slow
def test_killed_training_resumes_under_dvc_repro(reproduced: Path) -> None:
    params_path = reproduced / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["profiles"]["smoke"].update(steps=400, checkpoint_every=2, val_every=100)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    last = reproduced / "models/espcn/x2/last.pt"
    marker = reproduced / "models/espcn/x2/config.sha256"
    smoke_digest = marker.read_text()  # the fixture's run; the new config gets a new digest
    proc = subprocess.Popen([sys.executable, "stages/train.py", "espcn"], cwd=reproduced, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300

        def new_checkpoint_written() -> bool:
            # The new config replaces the fixture's checkpoints: wait for its digest, then its first last.pt.
            try:
                return marker.read_text() != smoke_digest and last.stat().st_mtime >= marker.stat().st_mtime
            except FileNotFoundError:
                return False

        while time.monotonic() < deadline and not new_checkpoint_written():
            time.sleep(0.05)
        assert new_checkpoint_written(), "training never wrote a checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = dvc(["repro", "train@espcn"], reproduced)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    train = json.loads((reproduced / "metrics/train/espcn.json").read_text())
    x2 = train["scales"]["x2"]
    assert x2["resumed_from_step"] is not None and 0 < x2["resumed_from_step"] < 400, x2
    assert x2["steps_done"] == 400
