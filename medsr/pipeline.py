"""The data stages as plain functions: DVC's ``stages/*.py``, the ``medsr`` CLI and the Prefect
flows all call these, so each step's logic lives once."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medsr.atomic import atomic_dir, write_json, write_text
from medsr.data import MODALITIES
from medsr.data.ingest import TABLE_NAME, IngestOptions, ingest
from medsr.data.sources.errors import SourceError
from medsr.params import section
from medsr.stage_entry import METRICS_DIR, PAIRS_DIR, StageFailed  # re-exported: the stage runner catches this class

RAW_DIR = Path("data/raw")
INTERIM_DIR = Path("data/interim")
VALIDATED_DIR = Path("data/validated")
SPLIT_DIR = Path("data/split")
REPORTS_DIR = Path("reports")


def _fetch(modality: str, spec: dict[str, Any], dest: Path, download: dict[str, Any]) -> dict[str, int] | None:
    """Fill ``dest`` from the modality's source; a local source returns what its re-sync changed."""
    kind = spec.get("kind", "sample")
    marker = dest / ".medsr-source.json"
    synced = None
    # data/raw persists between runs (so Kaggle downloads resume); a change of kind starts afresh.
    if marker.is_file() and json.loads(marker.read_text()).get("kind") != kind:
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "sample":
        from medsr.data.sources.sample import fetch_sample
        fetch_sample(modality, dest)
    elif kind == "kaggle":
        from medsr.data.sources.kaggle import download_kaggle
        cfg = spec.get("kaggle") or {}
        if not cfg.get("dataset"):
            raise SourceError(f"data.sources.{modality}.kaggle.dataset is empty: name a Kaggle dataset slug or use kind: sample")
        download_kaggle(cfg["dataset"], dest, max_images=int(cfg.get("max_images", 100)), include=cfg.get("include"),
                        retries=int(download.get("retries", 3)), backoff_seconds=float(download.get("backoff_seconds", 2.0)))
    elif kind == "local":
        from medsr.data.loading import SUPPORTED_SUFFIXES
        from medsr.data.sources.local import sync_local_images
        synced = sync_local_images((spec.get("local") or {}).get("path"), dest, SUPPORTED_SUFFIXES, modality).counts()
    else:
        raise SourceError(f"data.sources.{modality}.kind is {kind!r}: use one of sample, kaggle, local")
    write_json(marker, {"kind": kind})
    return synced


def download_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Fetch every modality's source into data/raw, then load, window, tile and tabulate it."""
    data = section(params, "data")
    sources = section(params, "data.sources")
    started = time.perf_counter()
    from medsr.data.sources.local import local_folder

    # Every local path is checked before anything is fetched: a refused one leaves data/raw untouched.
    for modality in MODALITIES:
        spec = sources.get(modality) or {}
        if spec.get("kind") == "local":
            local_folder((spec.get("local") or {}).get("path"), modality, RAW_DIR / modality)
    local_sync: dict[str, dict[str, int]] = {}
    for modality in MODALITIES:
        if modality in sources:
            synced = _fetch(modality, sources[modality], RAW_DIR / modality, data.get("download", {}))
            if synced is not None:
                local_sync[modality] = synced
    fetched = time.perf_counter()
    kinds = {m: sources[m].get("kind", "sample") for m in sources}
    # Local processes by default; a Dask cluster when data.dask_scheduler names one. Same bytes either way.
    table = ingest(RAW_DIR, INTERIM_DIR, IngestOptions.from_params(data), kinds,
                   workers=int(data.get("workers", 1)), dask_address=data.get("dask_scheduler") or None)
    loaded = table[table["error"].isna()]
    summary = {
        "files": int(table["path"].nunique()),
        "images": int(len(loaded)),
        "load_errors": int(table["error"].notna().sum()),
        "images_per_modality": {m: int((loaded["modality"] == m).sum()) for m in MODALITIES},
        "sources": kinds,
        **({"local_sync": local_sync} if local_sync else {}),
        "seconds": {"fetch": round(fetched - started, 2), "ingest": round(time.perf_counter() - fetched, 2)},
    }
    write_json(METRICS_DIR / "download.json", summary)
    return summary


def validate_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Quarantine what fails the GE suite or the pixel checks; fail if too much does."""
    from medsr.data.validation import render_report, validate_table

    data = section(params, "data")
    max_fraction = float(data["max_quarantine_fraction"])
    table = pd.read_parquet(INTERIM_DIR / TABLE_NAME)
    result = validate_table(table, INTERIM_DIR, min_size=int(data["min_size"]))
    write_text(REPORTS_DIR / "validation.html", render_report(result, max_fraction))
    summary = {**result.summary, "max_quarantine_fraction": max_fraction}
    write_json(METRICS_DIR / "validation.json", summary)
    if result.quarantined_fraction > max_fraction:
        raise StageFailed(
            f"validation failed: {summary['quarantined']} of {summary['images']} images quarantined "
            f"({100 * result.quarantined_fraction:.0f}% > data.max_quarantine_fraction {100 * max_fraction:.0f}%); "
            f"reasons in {REPORTS_DIR / 'validation.html'}")
    with atomic_dir(VALIDATED_DIR) as tmp:
        result.passed.to_parquet(tmp / TABLE_NAME, index=False)
        result.quarantine.to_csv(tmp / "quarantine.csv", index=False)
    return summary


def split_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Split the validated table (see medsr.data.split); refuse to write a split that leaks."""
    from medsr.data.split import GAP, SPLITS, empty_splits, files_per_split, find_leaks, split_table

    cfg = section(params, "data.split")
    table = pd.read_parquet(VALIDATED_DIR / TABLE_NAME)
    result = split_table(table, cfg["fractions"], int(cfg["seed"]), int(cfg.get("min_patients", 3)))
    leaks = find_leaks(result)
    if leaks:  # a bug, not bad input: never let it through
        raise StageFailed(f"split leaked across splits ({len(leaks)} finding(s), first: {leaks[0]}); refusing to write it")
    empty = empty_splits(result, cfg["fractions"])
    if empty:  # a model would be chosen and scored without any image of that modality
        raise StageFailed(f"split: {'; '.join(empty)}; add images of that modality (or more files), or see "
                          f"{REPORTS_DIR / 'validation.html'} for what was quarantined")
    with atomic_dir(SPLIT_DIR) as tmp:
        result.to_parquet(tmp / TABLE_NAME, index=False)
    summary = {
        "images": {m: {s: int(((result["modality"] == m) & (result["split"] == s)).sum()) for s in (*SPLITS, GAP)}
                   for m in MODALITIES},
        "files": files_per_split(result),
        "patients": {m: int(result.loc[result["modality"] == m, "patient_key"].nunique()) for m in MODALITIES},
        "method": {m: sorted(result.loc[result["modality"] == m, "split_method"].unique().tolist()) for m in MODALITIES},
    }
    write_json(METRICS_DIR / "split.json", summary)
    return summary


def degrade_stage(params: dict[str, Any]) -> dict[str, Any]:
    from medsr.data.pairing import build_pair_sets

    cfg = section(params, "degrade")
    table = pd.read_parquet(SPLIT_DIR / TABLE_NAME)
    started = time.perf_counter()
    with atomic_dir(PAIRS_DIR) as tmp:
        counts = build_pair_sets(table, INTERIM_DIR, tmp, cfg)
    summary = {"pairs": counts, "total_pairs": sum(n for s in counts.values() for x in s.values() for n in x.values()),
               "seconds": round(time.perf_counter() - started, 2)}
    write_json(METRICS_DIR / "degrade.json", summary)
    return summary

