"""Scales of one model trained side by side, one process each (``train.concurrent_scales``).

Each scale's run must compute exactly what it computes alone on the same number of torch threads
(the share of each process and its threads are fixed before any starts), and a failure in either
process must fail the stage with the scale named, leaving no process behind.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_training import write_pair_sets

from medsr.params import load_params
from medsr.stage_entry import StageFailed
from medsr.training import TrainConfig, load_checkpoint
from medsr.training.stage import config_digest, previous_seconds, process_shares, scale_concurrency, train_stage

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64-px HR images: x4 LR is 16 px; the x4 validation sets come from a second root (its tiles are not used).
    root = write_pair_sets(tmp_path_factory.mktemp("pairs-x2"), 2, hr_size=64)
    other = write_pair_sets(tmp_path_factory.mktemp("pairs-x4"), 4, hr_size=64)
    shutil.copytree(other / "val" / "x4", root / "val" / "x4")
    return root


def two_scale_params(pairs_root: Path, work: Path, concurrent_scales: Any, **espcn: Any) -> dict[str, Any]:
    """params.yaml on the smoke profile at x2 and x4, everything under ``work``; ``espcn`` holds
    per-scale entries (``x4={...}``) of the smoke profile's espcn budget."""
    params = copy.deepcopy(load_params(REPO_ROOT / "params.yaml"))
    params["degrade"]["scales"] = [2, 4]
    section = params["train"]
    section.update(profile="smoke", pairs_root=str(pairs_root), out_root=str(work / "models"), device="cpu",
                   num_workers=0, early_stopping_patience=None)
    smoke = section["profiles"]["smoke"]
    smoke.update(lr_patch=8, steps=24, val_every=6, checkpoint_every=6, concurrent_scales=concurrent_scales)
    smoke.setdefault("models", {})["espcn"] = dict(espcn)
    return params


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stage's working directory (metrics/ is relative) and its own MLflow store; a spawned
    process inherits both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def runs_by_name(work: Path) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return {run.info.run_name: run for run in mlflow.search_runs(experiment_names=["medsr"], output_format="list")}


def test_each_scale_computes_what_it_computes_alone_on_as_many_threads(
        pairs_root: Path, workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    together = train_stage(two_scale_params(pairs_root, workdir / "together", 2), "espcn")
    logged = capfd.readouterr().err
    # x2 trained in another process (the spawned one announces itself), on one thread of the two cores.
    announced = re.search(r"espcn x2: training in process (\d+) beside its other scales, on 1 torch thread", logged)
    assert announced and int(announced.group(1)) != os.getpid(), logged[-3000:]
    assert multiprocessing.active_children() == []

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train_stage(two_scale_params(pairs_root, workdir / "alone", 1), "espcn")
    finally:
        torch.set_num_threads(previous)
    for scale in ("x2", "x4"):
        ours = load_checkpoint(workdir / "together" / "models" / "espcn" / scale / "last.pt")
        theirs = load_checkpoint(workdir / "alone" / "models" / "espcn" / scale / "last.pt")
        assert ours["step"] == theirs["step"] == 24
        assert ours["generator"].keys() == theirs["generator"].keys()
        assert all(torch.equal(ours["generator"][k], theirs["generator"][k]) for k in ours["generator"]), scale
        assert together["scales"][scale]["best_val_psnr"] == alone["scales"][scale]["best_val_psnr"]

    runs = runs_by_name(workdir)
    assert {"espcn-x2", "espcn-x4"} <= set(runs)
    ids = {together["scales"][s]["run_id"] for s in ("x2", "x4")}
    concurrent = [run for run in runs.values() if run.info.run_id in ids]
    assert len(concurrent) == 2
    assert all(run.info.status == "FINISHED" and run.data.tags["torch_threads"] == "1" for run in concurrent)


def test_the_last_record_decides_which_scale_is_spawned_and_is_replaced(
        pairs_root: Path, workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # DVC deletes a stage's outputs before its command unless they persist: the record must survive to be read.
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    record_out = next(out for out in stage["metrics"] if "metrics/train/${key}.json" in out)
    assert record_out["metrics/train/${key}.json"].get("persist") is True
    record = workdir / "metrics" / "train" / "espcn.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"model": "espcn", "scales": {"x2": {"seconds": 157.0}, "x4": {"seconds": 123.0}}}')
    summary = train_stage(two_scale_params(pairs_root, workdir, 2), "espcn")
    logged = capfd.readouterr().err
    # x2 took longest last time: this process trains it, x4 goes to the spawned one.
    assert re.search(r"espcn x4: training in process \d+ beside its other scales", logged), logged[-3000:]
    assert not re.search(r"espcn x2: training in process", logged)
    assert json.loads(record.read_text()) == summary and summary["scales"]["x2"]["seconds"] < 157.0


def test_a_failure_in_the_spawned_process_fails_the_stage_naming_its_scale(pairs_root: Path, workdir: Path) -> None:
    params = two_scale_params(pairs_root, workdir, 2, x2={"model_options": {"no_such_option": 1}})
    old = workdir / "metrics" / "train" / "espcn.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"model": "espcn", "scales": {"x2": {"seconds": 1.0}, "x4": {"seconds": 2.0}}}')  # a past run's
    with pytest.raises(StageFailed, match=r"espcn x2: .*no_such_option"):
        train_stage(params, "espcn")
    assert multiprocessing.active_children() == []
    assert load_checkpoint(workdir / "models" / "espcn" / "x4" / "last.pt")["step"] == 24  # its sibling finished
    assert not (workdir / "metrics" / "train" / "espcn.json").exists()  # no summary of a failed stage


def test_a_failure_in_the_stage_process_stops_the_spawned_one(pairs_root: Path, workdir: Path) -> None:
    params = two_scale_params(pairs_root, workdir, 2, x4={"model_options": {"no_such_option": 1}})
    with pytest.raises(Exception, match="no_such_option"):
        train_stage(params, "espcn")
    assert multiprocessing.active_children() == []
    # Stopped, not waited for: x2 had not finished (it needs seconds to start; x4 failed at once).
    x2 = workdir / "models" / "espcn" / "x2" / "last.pt"
    assert not x2.exists() or load_checkpoint(x2)["step"] < 24
    assert not (workdir / "metrics" / "train" / "espcn.json").exists()


def test_how_many_scales_train_at_once(pairs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def config(value: Any, **overrides: Any) -> TrainConfig:
        return TrainConfig.from_params(two_scale_params(pairs_root, tmp_path, value), "espcn", 2, **overrides)

    auto = config("auto", device="auto")
    assert scale_concurrency(auto, 2, cores=2) == 2
    assert scale_concurrency(auto, 3, cores=2) == 2
    assert scale_concurrency(auto, 2, cores=1) == 1  # a process per scale needs a core per process
    assert scale_concurrency(auto, 1, cores=8) == 1
    assert scale_concurrency(auto, 2, cores=2, distributed=True) == 1  # a torchrun rank is already one of N
    assert scale_concurrency(config(1), 2, cores=2) == 1
    assert scale_concurrency(config(5), 2, cores=2) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert scale_concurrency(auto, 2, cores=2) == 1  # one GPU: the scales would queue on it
    assert scale_concurrency(config(2), 2, cores=2) == 2  # an explicit number is a cap on any device
    for bad in ("two", 0, -1, True, 1.5):
        with pytest.raises(ValueError, match="concurrent_scales must be auto or a positive integer"):
            config(bad)
    # How a run is scheduled is not what it computes: a run resumes under any setting.
    assert config_digest(config(1)) == config_digest(config(2)) == config_digest(auto)


def test_the_stage_process_takes_the_share_that_took_longest_last_time(tmp_path: Path) -> None:
    assert process_shares([2, 4], 2) == [[2], [4]]  # no record: the largest scale stays here
    assert process_shares([2, 4], 2, {2: 157.0, 4: 123.0}) == [[4], [2]]
    assert process_shares([2, 4], 2, {2: 30.0, 4: 46.0}) == [[2], [4]]
    assert process_shares([2, 3, 4], 2, {2: 10.0, 3: 50.0, 4: 10.0}) == [[2, 4], [3]]
    record = tmp_path / "espcn.json"
    record.write_text('{"model": "espcn", "scales": {"x2": {"seconds": 157.0}, "x4": {"seconds": 123.0}}}')
    assert previous_seconds(record) == {2: 157.0, 4: 123.0}
    record.write_text("{not json")
    assert previous_seconds(record) == {} and previous_seconds(tmp_path / "missing.json") == {}
