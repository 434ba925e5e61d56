"""Degrading in parallel (local processes or a Dask cluster) writes exactly the bytes one process writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsr.data.pairing import build_pair_sets
from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, dict]:
    root = tmp_path_factory.mktemp("interim")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        modality = ("xray", "ct", "mri")[i % 3]
        np.save(root / f"{i}.npy", rng.random((1, 48 + 8 * (i % 2), 64), dtype=np.float32))
        rows.append({"id": f"{modality}-{i:03d}", "modality": modality, "array": f"{i}.npy",
                     "split": ("train", "val", "test")[i % 3]})
    params = load_params(REPO_ROOT / "params.yaml")["degrade"]
    return root, pd.DataFrame(rows), params


def test_one_and_two_workers_write_identical_pairs(images, tmp_path: Path) -> None:
    interim, table, params = images
    one = build_pair_sets(table, interim, tmp_path / "one", params, workers=1)
    two = build_pair_sets(table, interim, tmp_path / "two", params, workers=2)
    assert one == two
    digests = _digests(tmp_path / "one")
    assert len(digests) > 30 and digests == _digests(tmp_path / "two")


def test_a_local_dask_cluster_writes_identical_pairs(images, tmp_path: Path) -> None:
    from distributed import LocalCluster

    interim, table, params = images
    build_pair_sets(table, interim, tmp_path / "one", params, workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        build_pair_sets(table, interim, tmp_path / "dask", params, dask_address=cluster.scheduler_address)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "dask")


def test_bad_worker_count_is_refused(images, tmp_path: Path) -> None:
    interim, table, params = images
    with pytest.raises(ValueError, match="degrade.workers"):
        build_pair_sets(table, interim, tmp_path / "x", params, workers=0)
