"""The Prefect flows against a real (test-harness) Prefect server, real DVC and real MLflow, on a copy
of the repository with the `smoke` training profile and one model.

Faults are injected at real boundaries only: the X-ray source is `kaggle`, served by a fake `kaggle`
package put first on PYTHONPATH for the stage processes (it fails the first N requests, or all of
them, with a connection error); nothing in the production code knows about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The `register` stage as the README asks dvc.yaml to declare it; added to the copy only if the
# checkout's dvc.yaml does not have it yet.
REGISTER_STAGE = {
    "cmd": "python stages/register.py",
    "deps": ["stages/register.py", "medsr/registry.py", "medsr/registry_cli.py", "metrics/benchmark.json", "metrics/train"],
    "params": ["degrade.scales", "registry"],
    "metrics": [{"metrics/register.json": {"cache": False}}],
}

FAKE_KAGGLE_API = '''
"""A stand-in for kaggle.api.kaggle_api_extended (tests only): serves files named in a JSON state
file and fails requests on demand with a connection error, as a network outage would."""
import json, os, shutil
from pathlib import Path
from types import SimpleNamespace

def _state_path():
    return Path(os.environ["MEDSR_FAKE_KAGGLE"])

def _request():
    path = _state_path()
    state = json.loads(path.read_text())
    state["requests"] += 1
    failing = state["always_fail"] or state["fail_next"] > 0
    if state["fail_next"] > 0:
        state["fail_next"] -= 1
    path.write_text(json.dumps(state))
    if failing:
        raise ConnectionError("simulated network outage")
    return state

class KaggleApi:
    def authenticate(self):
        pass

    def dataset_list_files(self, dataset, page_token=None, page_size=20):
        state = _request()
        files = [SimpleNamespace(name=name, total_bytes=os.path.getsize(src)) for name, src in state["files"].items()]
        return SimpleNamespace(files=files, next_page_token="", error_message="")

    def dataset_download_file(self, dataset, file_name, path=None, force=False, quiet=True):
        state = _request()
        shutil.copy(state["files"][file_name], Path(path) / Path(file_name).name)
        return True
'''


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One Prefect test server for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(PREFECT_API_URL.value())


def _copy_repo(work: Path) -> None:
    top_level_skip = {".venv", ".git", "data", "reports", "mlruns", "mlartifacts", "mlflow.db", "models", "benchmarks",
                      "metrics", "plots", "dvc.lock", "pretrained", "tmp"}  # pretrained/: a fresh machine has no weights

    def skip(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n in {"__pycache__", ".pytest_cache"}}
        if Path(folder) == REPO_ROOT / ".dvc":
            skipped |= {"cache", "tmp"} & set(names)
        return skipped | (top_level_skip & set(names) if Path(folder) == REPO_ROOT else set())

    shutil.copytree(REPO_ROOT, work, ignore=skip)


def _edit_yaml(path: Path, edit: Any) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _xray_png(folder: Path) -> Path:
    """A 768x768 crop of the embedded chest radiograph as an 8-bit PNG: 9 tiles, not the DICOM's 49,
    which keeps the benchmark inside the test budget."""
    import numpy as np
    import pydicom
    from PIL import Image

    from medsr.data.sources.sample import fetch_sample

    dicom = next(Path(p) for p in fetch_sample("xray", folder / "sample") if str(p).endswith(".dcm"))
    pixels = pydicom.dcmread(dicom).pixel_array.astype(np.float64)
    h, w = pixels.shape
    crop = pixels[h // 2 - 384:h // 2 + 384, w // 2 - 384:w // 2 + 384]
    low, high = np.percentile(crop, (0.5, 99.5))
    gray = 255 - np.clip((crop - low) / (high - low) * 255, 0, 255)  # MONOCHROME1: inverted
    path = folder / "chest_0001.png"
    Image.fromarray(gray.astype(np.uint8)).save(path)
    return path


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from flows.pipeline import dvc_command, subprocess_env

    return subprocess.run([*dvc_command(), *args], cwd=repo, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def flow_repo(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Path]:
    """A copy of the repository: smoke profile, ESPCN only, X-ray from the fake Kaggle, quick retries."""
    root = tmp_path_factory.mktemp("flows")
    repo = root / "repo"
    _copy_repo(repo)
    fake = root / "fake-kaggle" / "kaggle"
    (fake / "api").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "api" / "__init__.py").write_text("")
    (fake / "api" / "kaggle_api_extended.py").write_text(FAKE_KAGGLE_API)

    patch = pytest.MonkeyPatch()
    patch.setenv("PYTHONPATH", str(fake.parent))
    patch.setenv("MEDSR_FAKE_KAGGLE", str(root / "fake-kaggle-state.json"))
    patch.setenv("KAGGLE_USERNAME", "medsr-test")
    patch.setenv("KAGGLE_KEY", "not-a-real-key")
    patch.setenv("KAGGLE_CONFIG_DIR", str(root / "kaggle-config"))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setenv("COLUMNS", "200")
    set_fake_kaggle(fail_next=0, always_fail=False, files={"images/chest_0001.png": str(_xray_png(root))})

    def edit_params(p: dict[str, Any]) -> None:
        p["train"]["profile"] = "smoke"
        p["data"]["volume_slice_step"] = 18  # fewer MRI slices: the benchmark's time is whole-image inference
        p["train"]["models"] = {"espcn": {}}  # the one list of models: DVC's train foreach and the benchmark
        xray = p["data"]["sources"]["xray"]
        xray["kind"] = "kaggle"
        xray["kaggle"] = {"dataset": "medsr-test/xray", "max_images": 1}
        p["data"]["download"] = {"retries": 0, "backoff_seconds": 0.0}  # the flow's retries, not the source's
        p["flows"]["download"] = {"retries": 2, "backoff_seconds": 0.2}
        p["flows"]["train"] = {"retries": 1, "backoff_seconds": 0.2}
        # 12 smoke steps do not beat bicubic everywhere: the lr 0.002 challenger is 2.9 dB under it on x4 clean X-ray
        p["registry"]["max_modality_loss_db"] = 5.0

    def edit_dvc(d: dict[str, Any]) -> None:
        d["stages"].setdefault("register", REGISTER_STAGE)

    _edit_yaml(repo / "params.yaml", edit_params)
    _edit_yaml(repo / "dvc.yaml", edit_dvc)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert _dvc(repo, "config", "--local", "core.site_cache_dir", str(root / "dvc-site")).returncode == 0
    try:
        yield repo
    finally:
        patch.undo()


def set_fake_kaggle(**state: Any) -> dict[str, Any]:
    path = Path(os.environ["MEDSR_FAKE_KAGGLE"])
    current = json.loads(path.read_text()) if path.is_file() else {"requests": 0}
    current.update(state)
    path.write_text(json.dumps(current))
    return current


def fake_kaggle_requests() -> int:
    return int(json.loads(Path(os.environ["MEDSR_FAKE_KAGGLE"]).read_text())["requests"])


FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def task_run_counts(flow_run_id: Any, expected: set[str], timeout: float = 60.0) -> dict[str, int]:
    """Task run name -> how many times it ran, for one flow run (its subflows' tasks excluded).

    The server records task runs from the events the client sends in the background, so this waits
    until every expected task run is there in a final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            counts = {run.name: run.run_count for run in runs}
            settled = all(run.state is not None and run.state.type.name in FINAL_STATES for run in runs)
            if (settled and expected <= set(counts)) or time.monotonic() > deadline:
                return counts
            time.sleep(0.5)


def flow_run_logs(flow_run_id: Any, wanted: str, timeout: float = 60.0) -> list[str]:
    """The flow run's log messages once one contains ``wanted`` (logs reach the server in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            messages = [log.message for log in logs]
            if any(wanted in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


def champion_versions(repo: Path) -> dict[str, str | None]:
    from mlflow import MlflowClient

    from medsr.registry import alias_version

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return {name: getattr(alias_version(client, name, "champion"), "version", None) for name in ("medsr-x2", "medsr-x4")}


def tree_digest(repo: Path, *relatives: str) -> dict[str, str]:
    digests = {}
    for relative in relatives:
        root = repo / relative
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                digests[path.relative_to(repo).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# ---------------------------------------------------------------------------------------------
# Tests (in file order: each builds on the repository state the previous one left)


def test_pipeline_flow_retries_a_transient_download_failure_and_completes(flow_repo: Path) -> None:
    from flows.pipeline import medsr_pipeline

    set_fake_kaggle(fail_next=2, always_fail=False, requests=0)
    state = medsr_pipeline(repo=str(flow_repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["sources", "download", "validate", "split", "degrade", "pretrained", "train@espcn", "benchmark",
                      "register"]
    assert all(s["ran"] for s in result["stages"])
    counts = task_run_counts(state.state_details.flow_run_id, {f"dvc repro {stage}" for stage in stages})
    assert counts["dvc repro download"] == 3  # failed twice (listing refused), then fetched the file
    assert counts["dvc repro train@espcn"] == 1
    assert fake_kaggle_requests() == 4  # two failed listings, one listing, one download
    assert (flow_repo / "data/raw/xray/images/chest_0001.png").is_file()

    decisions = result["register"]["decisions"]
    assert {d["action"] for d in decisions.values()} == {"promoted"}
    assert champion_versions(flow_repo) == {"medsr-x2": 1, "medsr-x4": 1}
    logs = flow_run_logs(state.state_details.flow_run_id, "medsr-x2: promoted")
    assert any("Running stage 'train@espcn'" in line for line in logs)  # the stages' output is in Prefect
    assert any("medsr-x2: promoted" in line for line in logs)

    status = _dvc(flow_repo, "status")
    # dvc.lock is true for make run; only the always-run `sources` check (local folders) is listed.
    lines = [line.strip() for line in status.stdout.splitlines() if line.strip()]
    assert status.returncode == 0 and lines in (["Data and pipelines are up to date."], ["sources:", "always changed"]), lines


def test_permanent_download_failure_fails_cleanly_and_leaves_data_and_champion(flow_repo: Path) -> None:
    from flows.pipeline import medsr_pipeline

    params_path = flow_repo / "params.yaml"
    original = params_path.read_text()
    kept = ("data/interim", "data/validated", "data/split", "data/pairs", "metrics")
    before = tree_digest(flow_repo, *kept)

    def locked_stages_but_sources() -> dict[str, Any]:
        # `sources` (a stat check, first in the DAG) succeeds with the edited params and records them;
        # every stage after it must keep its lock entry.
        stages = yaml.safe_load((flow_repo / "dvc.lock").read_text())["stages"]
        return {name: entry for name, entry in stages.items() if name != "sources"}

    lock_before = locked_stages_but_sources()
    champions_before = champion_versions(flow_repo)
    # A bigger request than the completed one, so the source has to ask the (dead) network.
    _edit_yaml(params_path, lambda p: p["data"]["sources"]["xray"]["kaggle"].update(max_images=2))
    set_fake_kaggle(always_fail=True, requests=0)
    try:
        state = medsr_pipeline(repo=str(flow_repo), return_state=True)
    finally:
        params_path.write_text(original)
        set_fake_kaggle(always_fail=False)

    assert state.is_failed()
    message = state.message or ""
    assert "\n" not in message and message.startswith("stage download failed: medsr download: "), message
    assert "still failing" in message and "ConnectionError" in message, message
    # 1 + flows.download.retries attempts, and no later stage started.
    counts = task_run_counts(state.state_details.flow_run_id, {"dvc repro download"})
    # Only the `sources` check (it runs first, on every repro) ran before it.
    assert counts.pop("dvc repro download") == 3 and set(counts) <= {"dvc repro sources"}, counts
    assert fake_kaggle_requests() == 3
    # DVC deleted data/interim before running the stage; the flow put the last good one back.
    assert tree_digest(flow_repo, *kept) == before and locked_stages_but_sources() == lock_before
    assert champion_versions(flow_repo) == champions_before
    assert (flow_repo / "data/raw/xray/images/chest_0001.png").is_file()


def test_retrain_keeps_the_champion_against_a_weaker_challenger_and_records_the_numbers(flow_repo: Path) -> None:
    from mlflow import MlflowClient

    from flows.retrain import retrain

    # New training settings make a new challenger; a 50 dB bar makes sure it is not promoted.
    params_path = flow_repo / "params.yaml"

    def edit(p: dict[str, Any]) -> None:
        p["train"]["models"]["espcn"] = {"lr_generator": 0.002}
        p["registry"]["min_gain_db"] = 50.0

    _edit_yaml(params_path, edit)
    state = retrain(repo=str(flow_repo), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()

    assert result["pulled"] is False and result["download"]["stage"] == "download"
    assert result["new_challenger"] is True
    ran = {s["stage"] for s in result["pipeline"] if s["ran"]}
    assert {"train@espcn", "benchmark", "register"} <= ran and "degrade" not in ran  # same data: not redone
    client = MlflowClient(tracking_uri=f"sqlite:///{flow_repo / 'mlflow.db'}")
    for scale, name in (("x2", "medsr-x2"), ("x4", "medsr-x4")):
        decision = result["decisions"][scale]
        assert decision["action"] == "kept" and decision["version"] == "2" and decision["champion_after"] == "1"
        assert "does not beat registry.min_gain_db 50 dB" in decision["reason"]
        assert "same data version" in decision["compared_on"]
        for role in ("challenger", "champion"):
            cells = [cell.split("/") for cell in decision[role]["per_modality"]]  # "<track>/<modality>"
            assert {t for t, _ in cells} == {"clean", "realistic"} and {m for _, m in cells} == {"ct", "mri", "xray"}
        assert decision["delta_db"] == pytest.approx(
            decision["challenger"]["mean_test_gain_db"] - decision["champion"]["mean_test_gain_db"], abs=1e-3)
        run = client.get_run(decision["decision_run_id"])
        assert run.data.tags["decision"] == "kept" and "delta_db" in run.data.metrics
        assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def _wait_for_deployment(name: str, timeout: float) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def test_schedule_serves_the_retrain_deployment_with_its_cron(flow_repo: Path, prefect_server: str) -> None:
    from flows.deploy import ScheduleError, schedule_settings

    with pytest.raises(ScheduleError, match="invalid schedule"):
        schedule_settings(flow_repo / "params.yaml", "every sunday", None, None)

    command = ("import typer; from medsr.registry_cli import schedule_command; typer.run(schedule_command)")
    env = dict(os.environ, PREFECT_API_URL=prefect_server)
    server = subprocess.Popen([sys.executable, "-c", command, "--cron", "15 4 * * 1", "--name", "served-retrain"],
                              cwd=flow_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deployment = _wait_for_deployment("retrain/served-retrain", timeout=90)
        assert server.poll() is None  # still serving
    finally:
        # SIGTERM, as a service manager stops it (SIGINT may be ignored in a non-interactive CI shell).
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert "serving retrain/served-retrain on cron '15 4 * * 1'" in output, output
    assert len(deployment.schedules) == 1
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "15 4 * * 1" and schedule.timezone == "UTC"
    assert deployment.parameters == {"repo": str(flow_repo.resolve())}
    assert deployment.entrypoint == "flows/retrain.py:retrain"


def test_prefect_yaml_deploys_the_same_flow_to_a_work_pool(flow_repo: Path, prefect_server: str) -> None:
    env = dict(os.environ, PREFECT_API_URL=prefect_server, MEDSR_REPO=str(flow_repo))
    prefect = str(Path(sys.executable).parent / "prefect")
    pool = subprocess.run([prefect, "work-pool", "create", "medsr", "--type", "process"], cwd=flow_repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--name", "weekly-retrain"], cwd=flow_repo, env=env,
                            capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    deployment = _wait_for_deployment("retrain/weekly-retrain", timeout=10)
    schedule_params = yaml.safe_load((flow_repo / "params.yaml").read_text())["flows"]["schedule"]
    assert deployment.work_pool_name == "medsr"
    assert [s.schedule.cron for s in deployment.schedules] == [schedule_params["cron"]] == ["0 3 * * 0"]
    assert deployment.entrypoint == "flows/retrain.py:retrain" and deployment.parameters == {"repo": "."}


def test_stage_specs_mark_the_stages_dvc_runs_on_every_repro() -> None:
    # bench_orchestration's no-op check skips these: `sources` runs (a stat) even when nothing changed.
    from flows.pipeline import pipeline_stages

    specs = pipeline_stages(REPO_ROOT)
    assert [s.name for s in specs if s.always_changed] == ["sources"]
    assert len(specs) > 5
