"""Shared fixtures: telemetry off, and the embedded sample ingested once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _name, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_name, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/raw as the `sample` source writes it, for all three modalities."""
    from medsr.data import MODALITIES
    from medsr.data.sources.sample import fetch_sample

    raw = tmp_path_factory.mktemp("raw")
    for modality in MODALITIES:
        fetch_sample(modality, raw / modality)
    return raw


@pytest.fixture(scope="session")
def sample_interim(sample_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample ingested with the default params (tiles, windowing, table)."""
    from medsr.data.ingest import IngestOptions, ingest
    from medsr.params import load_params

    out = tmp_path_factory.mktemp("interim") / "interim"
    options = IngestOptions.from_params(load_params(REPO_ROOT / "params.yaml")["data"])
    ingest(sample_raw, out, options, {"xray": "sample", "ct": "sample", "mri": "sample"})
    return out


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """One intra-op thread for in-process tests: with two, OpenMP spin-waiting on a shared 2-core machine
    makes small models several times slower (and DataLoader workers compete for the same cores)."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow (end-to-end) tests first, in their collected order otherwise: with one pytest process per
    core (`make test`), the longest files start at once instead of one running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
