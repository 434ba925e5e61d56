"""Ingesting in parallel (local processes or a Dask cluster) writes exactly the bytes one process writes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsr.data import MODALITIES
from medsr.data.ingest import TABLE_NAME, IngestOptions, ingest
from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"xray": "sample", "ct": "sample", "mri": "sample"}
SHARD_BYTES = 1 << 20  # small shards, so that tiles from several files, and workers, fill each one


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(sample_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded sample (DICOM, NIfTI, PNG) plus synthetic 16-bit PNGs, one unreadable file and
    a patients.csv. The first x-ray file is a large image, so with two workers it finishes after
    files that come later in the table: rows appended in completion order would show."""
    root = tmp_path_factory.mktemp("raw")
    for modality in MODALITIES:
        shutil.copytree(sample_raw / modality, root / modality)
    xray = root / "xray"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((1536, 1536)) * 65535).astype(np.uint16)).save(xray / "000-large.png")
    for i in range(24):
        side = 96 + 16 * (i % 3)
        Image.fromarray((rng.random((side, side + 8)) * 65535).astype(np.uint16)).save(xray / f"synthetic-{i:02d}.png")
    for i in range(4):  # 8-bit images: their tiles go to uint8 shards
        Image.fromarray((rng.random((300, 280)) * 255).astype(np.uint8)).save(xray / f"synthetic-8bit-{i}.png")
    (xray / "broken.png").write_bytes(b"not a png")
    (xray / "patients.csv").write_text("path,patient_id\nsynthetic-00.png,P1\nsynthetic-01.png,P1\n")
    return root


@pytest.fixture(scope="module")
def options() -> IngestOptions:
    return IngestOptions.from_params(load_params(REPO_ROOT / "params.yaml")["data"])


@pytest.fixture(scope="module")
def one_worker(raw: Path, options: IngestOptions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "interim"
    ingest(raw, out, options, SOURCES, workers=1, shard_bytes=SHARD_BYTES)
    return out


def test_one_and_two_workers_write_identical_interim(raw: Path, options: IngestOptions, one_worker: Path,
                                                     tmp_path: Path) -> None:
    ingest(raw, tmp_path / "interim", options, SOURCES, workers=2, shard_bytes=SHARD_BYTES)
    digests = _digests(one_worker)
    shards = [name for name in digests if name.startswith("shards/")]
    assert TABLE_NAME in digests and len(shards) == len(digests) - 1
    assert any(name.startswith("shards/u8-") for name in shards) and "shards/u16-00002.npy" in shards
    assert digests == _digests(tmp_path / "interim")


def test_a_local_dask_cluster_writes_identical_interim(raw: Path, options: IngestOptions, one_worker: Path,
                                                       tmp_path: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        ingest(raw, tmp_path / "interim", options, SOURCES, dask_address=cluster.scheduler_address,
               shard_bytes=SHARD_BYTES)
    assert _digests(one_worker) == _digests(tmp_path / "interim")


def test_the_table_is_in_file_order_with_errors_and_patients(raw: Path, one_worker: Path) -> None:
    import pandas as pd

    table = pd.read_parquet(one_worker / TABLE_NAME)
    modality_rank = table["modality"].map({m: i for i, m in enumerate(MODALITIES)})
    assert modality_rank.is_monotonic_increasing
    for _, rows in table.groupby("modality", sort=False):
        assert list(rows["path"]) == sorted(rows["path"])  # raw_files order, not completion order
    broken = table[table["path"] == "xray/broken.png"]
    assert len(broken) == 1 and broken["error"].iloc[0].startswith("xray/broken.png: ")
    assert str(raw) not in broken["error"].iloc[0]  # no absolute path: the row must not depend on where raw lies
    keys = table.set_index("path")["patient_key"]
    assert keys["xray/synthetic-00.png"] == keys["xray/synthetic-01.png"] != keys["xray/synthetic-02.png"]


def test_bad_worker_count_is_refused(raw: Path, options: IngestOptions, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.workers"):
        ingest(raw, tmp_path / "interim", options, SOURCES, workers=0)
    assert not (tmp_path / "interim").exists()


def test_the_download_stage_reads_the_params() -> None:
    data = load_params(REPO_ROOT / "params.yaml")["data"]
    assert data["workers"] == 1 and data["dask_scheduler"] is None
    import yaml

    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["download"]
    assert {"data.workers", "data.dask_scheduler"} <= set(stage["params"])
