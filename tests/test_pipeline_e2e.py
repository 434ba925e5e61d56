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


def _env(repo: Path) -> dict[str, str]:
    # PYTHONPATH: the stages import the copy's medsr, not the editable install's checkout, which
    # others may be editing meanwhile (the training digest would see a code change).
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="",
                PYTHONPATH=str(repo))


def dvc(args: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def computed(stages: list[str]) -> list[str]:
    """The stages that computed something: `sources` runs on every repro (a stat check of local
    source folders, always_changed in dvc.yaml) and rewrites nothing when they did not change."""
    return [s for s in stages if s != "sources"]


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
    assert (reproduced / "data/pairs/test/x4/clean/index.json").is_file()
    assert (reproduced / "data/pairs/train/hr/index.json").is_file()  # training pairs are degraded as drawn
    assert (reproduced / "reports/validation.html").is_file()
    report = json.loads((reproduced / "metrics/benchmark.json").read_text())
    models = {r["model"] for r in report["results"]}
    assert models == {"bicubic", "bicubic+consistency", "espcn", "srgan", "swift_srgan", "brainsr", "blimsr",
                      "residual_cnn"}
    for row in report["results"]:
        assert row["modality"] in {"xray", "ct", "mri", "all"} and row["images"] > 0
        assert 10.0 < row["psnr"] < 100.0 and 0.0 < row["ssim"] <= 1.0
        # Every row carries the network's own gain beside the system's (the baselines' network is bicubic).
        assert row["network_gain_db"] is not None and row["baseline_gain_db"] is not None
    assert report["models"]["espcn"]["x4"]["params"] == 61_840
    for name in ("espcn", "blimsr"):
        train = json.loads((reproduced / f"metrics/train/{name}.json").read_text())
        assert train["scales"]["x2"]["model_uri"].startswith("models:/")
    assert (reproduced / "plots/psnr.csv").is_file() and (reproduced / "plots/crops_x4.png").stat().st_size > 1000
    assert (reproduced / "mlflow.db").is_file()


@pytest.mark.slow
def test_second_repro_is_noop_and_param_changes_rerun_only_their_stages(reproduced: Path) -> None:
    second = dvc(["repro"], reproduced)
    assert second.returncode == 0, second.stderr
    assert ran_stages(second.stdout) == ["sources"], second.stdout

    params_path = reproduced / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["train"]["models"]["espcn"]["lr_generator"] = 0.0003
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        # A dry run lists the stages whose own deps changed (downstream ones follow once outputs differ):
        # only this model retrains, none of the other five; the benchmark, which reads train.models for
        # the list of models it scores, reruns too (as it would after the retrained model anyway), and so
        # does the pretrained stage, which reads train.models for the checkpoints they name as `init`
        # (a no-op without one: its output, and so the other models' deps, stay the same).
        assert computed(ran_stages(dvc(["repro", "--dry"], reproduced).stdout)) == ["pretrained", "train@espcn",
                                                                                   "benchmark"]

        params = yaml.safe_load(original)
        params["degrade"]["blur_sigma"] = 0.7
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        # The benchmark reads the blur too: it degrades the held-out images of its realistic track itself.
        assert computed(ran_stages(dvc(["repro", "--dry"], reproduced).stdout)) == ["degrade", "benchmark"]
    finally:
        params_path.write_text(original)


@pytest.mark.slow
def test_a_second_clone_pulls_from_the_remote_and_has_nothing_to_recompute(reproduced: Path, tmp_path: Path) -> None:
    """Clone A ran the pipeline and pushes to a DVC remote; clone B (what git holds: code, params,
    dvc.lock, metrics) pulls, and `dvc repro` then retrains nothing."""
    remote = tmp_path / "remote"
    added = dvc(["remote", "add", "--default", "--force", "shared", str(remote)], reproduced)
    assert added.returncode == 0, added.stderr
    pushed = dvc(["push"], reproduced)
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-2000:]
    assert any(remote.rglob("*")), "nothing reached the remote"

    def git_tracked(folder: str, names: list[str]) -> set[str]:
        # What a `git clone` of A has: no DVC outputs, no cache, no MLflow store, no local config.
        top_level = {"data", "models", "reports", "mlflow.db", "mlartifacts"}
        skipped = {n for n in names if n == "__pycache__" or (Path(folder) == reproduced and n in top_level)}
        if Path(folder).name == ".dvc":
            skipped |= {n for n in names if n in {"cache", "tmp", "config.local"}}
        return skipped

    clone = tmp_path / "clone"
    shutil.copytree(reproduced, clone, ignore=git_tracked)
    dvc(["config", "--local", "core.site_cache_dir", str(tmp_path / "dvc-site")], clone)
    pulled = dvc(["pull"], clone)
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    assert (clone / "models/espcn/x4/best.pt").is_file() and (clone / "data/pairs/test/x4/clean/index.json").is_file()
    again = dvc(["repro"], clone)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert computed(ran_stages(again.stdout)) == [], again.stdout  # nothing retrained, nothing recomputed


@pytest.mark.slow
def test_changed_degradation_retrains_from_step_0_and_mlflow_records_the_new_data(reproduced: Path) -> None:
    """A finished checkpoint is not "resumed" onto new data: MLflow would report the old model as trained on it."""
    from mlflow.tracking import MlflowClient

    marker = reproduced / "models/espcn/x2/inputs.json"
    before = json.loads(marker.read_text())
    old_run = json.loads((reproduced / "metrics/train/espcn.json").read_text())["scales"]["x2"]["run_id"]
    params_path = reproduced / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["degrade"]["blur_sigma"] = params["degrade"]["blur_sigma"] + 0.1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))  # left so: the next test builds on it

    result = dvc(["repro", "train@espcn"], reproduced)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert computed(ran_stages(result.stdout)) == ["degrade", "train@espcn"], result.stdout
    steps = params["train"]["profiles"]["smoke"]["steps"]
    trained = json.loads((reproduced / "metrics/train/espcn.json").read_text())["scales"]
    for scale, result_of in trained.items():  # every scale trained afresh, to the full budget
        assert result_of["resumed_from_step"] is None and result_of["steps_done"] == steps, (scale, result_of)
    log = result.stdout + result.stderr
    assert "the training data changed" in log and "training starts at step 0" in log, log[-3000:]
    after = json.loads(marker.read_text())
    assert after["data"] != before["data"] and (after["config"], after["code"]) == (before["config"], before["code"])

    client = MlflowClient(tracking_uri=f"sqlite:///{reproduced / 'mlflow.db'}")
    old_tags = client.get_run(old_run).data.tags
    for scale, result_of in trained.items():
        tags = client.get_run(result_of["run_id"]).data.tags
        assert tags["resumed_from_step"] == "None"
        assert tags["pairs_version"] == json.loads((reproduced / f"models/espcn/{scale}/inputs.json").read_text())["data"]
        # DVC's own version of data/pairs (dvc.lock) moved too: degrade was committed before train ran.
        lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
        pairs_md5 = next(o["md5"] for o in lock["stages"]["degrade"]["outs"] if o["path"] == "data/pairs")
        assert tags["data_version"] == f"dvc:{pairs_md5}" != old_tags["data_version"]
    assert client.get_run(trained["x2"]["run_id"]).data.tags["pairs_version"] == after["data"] != old_tags["pairs_version"]


@pytest.mark.slow
def test_killed_training_resumes_under_dvc_repro(reproduced: Path) -> None:
    params_path = reproduced / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["profiles"]["smoke"].update(steps=400, checkpoint_every=2, val_every=100)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    last = reproduced / "models/espcn/x2/last.pt"
    marker = reproduced / "models/espcn/x2/inputs.json"
    smoke_digest = marker.read_text()  # the previous run's inputs; the new config gets a new digest
    proc = subprocess.Popen([sys.executable, "stages/train.py", "espcn"], cwd=reproduced, env=_env(reproduced),
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
