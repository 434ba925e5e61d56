"""The train stage's resume rule: a checkpoint in models/<model>/x<scale> is resumed only when the
config, the data of the pairs it reads and the model's code are those that wrote it; otherwise
the folder is emptied, training starts at step 0, and the log says which of them changed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from medsr.data.pairs import PairItem, write_pairs
from medsr.training import TrainConfig
from medsr.training.stage import INPUTS_NAME, REPO_ROOT, code_files, prepare_out_dir, training_inputs


def write_sets(root: Path, noise: float) -> None:
    """Tiny pair sets where a degrade stage would put them; ``noise`` stands for a degrade param."""
    rng = np.random.default_rng(0)
    hr = rng.random((1, 32, 32), dtype=np.float32)
    lr = np.clip(hr[:, ::2, ::2] + np.float32(noise), 0.0, 1.0)
    items = [PairItem(f"ct-{i:04d}", "ct", hr=hr, lr=lr) for i in range(3)]
    for split in ("train", "val"):
        write_pairs(root / split / "x2" / "standard", items, 2, {"split": split, "kind": "standard"})


@pytest.fixture
def config(tmp_path: Path) -> TrainConfig:
    write_sets(tmp_path / "pairs", noise=0.0)
    return TrainConfig(model="espcn", scale=2, pairs_root=str(tmp_path / "pairs"), out_dir=str(tmp_path / "models" / "x2"))


def checkpoint_of(config: TrainConfig) -> Path:
    """A stand-in for what a killed run leaves (the decision reads only the folder and its record)."""
    last = Path(config.out_dir) / "last.pt"
    last.write_bytes(b"state of a killed run")
    return last


def test_same_inputs_keep_the_checkpoint(config: TrainConfig, caplog: pytest.LogCaptureFixture) -> None:
    prepare_out_dir(config)
    last = checkpoint_of(config)
    with caplog.at_level(logging.INFO, logger="medsr.training.stage"):
        prepare_out_dir(config)
    assert last.is_file()
    assert "resuming" in caplog.text


def test_changed_pair_data_starts_at_step_0(config: TrainConfig, caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_out_dir(config)
    last = checkpoint_of(config)
    write_sets(Path(config.pairs_root), noise=0.01)  # same ids, offsets and shapes: only pixels differ
    with caplog.at_level(logging.INFO, logger="medsr.training.stage"):
        second = prepare_out_dir(config)
    assert not last.exists()
    assert second["data"] != first["data"] and second["config"] == first["config"] and second["code"] == first["code"]
    assert "the training data changed" in caplog.text and "step 0" in caplog.text
    assert (Path(config.out_dir) / INPUTS_NAME).is_file()  # recorded before training, for a resume


def test_changed_model_options_start_at_step_0(config: TrainConfig, caplog: pytest.LogCaptureFixture) -> None:
    prepare_out_dir(config)
    last = checkpoint_of(config)
    config.model_options = {"channels": 32}
    with caplog.at_level(logging.INFO, logger="medsr.training.stage"):
        prepare_out_dir(config)
    assert not last.exists() and "the training config (or model options) changed" in caplog.text


def test_no_record_is_not_resumed(config: TrainConfig, caplog: pytest.LogCaptureFixture) -> None:
    Path(config.out_dir).mkdir(parents=True)
    last = checkpoint_of(config)  # e.g. written by an older version that recorded the config only
    with caplog.at_level(logging.INFO, logger="medsr.training.stage"):
        prepare_out_dir(config)
    assert not last.exists() and "no record of the inputs" in caplog.text


def test_execution_only_settings_do_not_change_the_digest(config: TrainConfig) -> None:
    before = training_inputs(config)
    config.num_workers, config.device, config.quiet = 3, "cpu", True
    assert training_inputs(config) == before


def test_code_version_covers_the_model_and_the_training_loop_only() -> None:
    files = {p.relative_to(REPO_ROOT).as_posix() for p in code_files("espcn")}
    assert {"medsr/models/espcn.py", "medsr/models/blocks.py", "medsr/training/trainer.py", "medsr/losses/recipes.py",
            "medsr/models/architectures.py"} <= files
    assert "medsr/models/srgan.py" not in files  # another model's edit must not retrain this one


def lock_for(config: TrainConfig, md5: str) -> Path:
    """A dvc.lock beside the pairs whose degrade stage records ``md5`` for them."""
    root = Path(config.pairs_root).parent
    (root / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  degrade:\n    outs:\n    - path: pairs\n      md5: {md5}\n")
    return root


def test_under_dvc_the_data_version_is_the_locks_hash(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` checked data/pairs against dvc.lock before the stage ran: its hash is taken as it
    is, and the pixel arrays are not read again."""
    root = lock_for(config, "0123abcd.dir")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_STAGE", "train@espcn")
    config.pairs_root = "pairs"
    before = training_inputs(config)
    write_sets(root / "pairs", noise=0.01)  # DVC would have rerun degrade and locked the new hash
    assert before["data"] == "dvc:0123abcd.dir"
    assert training_inputs(config) == before


def test_outside_dvc_a_stale_lock_is_not_trusted(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside `dvc repro` (no DVC_STAGE) the pair sets are hashed: rewritten since the lock, they count as changed."""
    root = lock_for(config, "0123abcd.dir")
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    config.pairs_root = "pairs"
    before = training_inputs(config)
    write_sets(root / "pairs", noise=0.01)
    assert not before["data"].startswith("dvc:")
    assert training_inputs(config)["data"] != before["data"]


def test_under_dvc_pairs_that_are_not_degrades_output_are_hashed(config: TrainConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = lock_for(config, "0123abcd.dir")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_STAGE", "train@espcn")
    (root / "other").mkdir()
    write_sets(root / "other", noise=0.0)
    config.pairs_root = "other"
    assert not training_inputs(config)["data"].startswith("dvc:")


def test_outside_dvc_a_checkout_of_the_locked_hash_keeps_the_locks_version(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `dvc repro` with the project's hard-linked cache: outside DVC the pairs are still the
    cache's checkout (same inodes), so the version is the lock's, as under `dvc repro`; rewritten
    (a new file under the old name), they are hashed again."""
    import configparser
    import os
    import subprocess
    import sys

    import yaml

    dvc_bin = Path(sys.executable).with_name("dvc")
    (tmp_path / "make_pairs.py").write_text(
        "import sys\nfrom pathlib import Path\nsys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from test_training_inputs import write_sets\nwrite_sets(Path('pairs'), noise=0.0)\n")
    stage = {"cmd": f"{sys.executable} make_pairs.py {REPO_ROOT} {REPO_ROOT / 'tests'}", "outs": ["pairs"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"degrade": stage}}))
    cache_type = configparser.ConfigParser()
    cache_type.read(REPO_ROOT / ".dvc" / "config")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_STAGE", None)
    for args in (["init", "--no-scm", "-q"], ["config", "cache.type", cache_type["cache"]["type"]], ["repro", "-q"]):
        done = subprocess.run([str(dvc_bin), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    config = TrainConfig(model="espcn", scale=2, pairs_root="pairs", out_dir=str(tmp_path / "models"))
    md5 = next(o["md5"] for o in yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["degrade"]["outs"])
    assert training_inputs(config)["data"] == f"dvc:{md5}"
    write_sets(tmp_path / "pairs", noise=0.0)  # the same bytes, but new files: no longer the cache's
    assert not training_inputs(config)["data"].startswith("dvc:")
