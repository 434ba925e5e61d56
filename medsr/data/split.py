"""Deterministic train/val/test split by patient, so no patient's images sit in two splits.

A modality with too few patients to give every split one (the embedded sample has one chest
radiograph) is split by region instead: each source file's tiles or slices, in scan order, are
cut into contiguous train/val/test blocks. The table says which method each row got.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _stable_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()


def _counts(n: int, fractions: Mapping[str, float]) -> list[int]:
    """Exact per-split counts (largest remainder), each split non-empty when n allows."""
    weights = np.array([float(fractions[s]) for s in SPLITS])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative and not all zero, got {dict(fractions)}")
    raw = weights / weights.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(SPLITS):  # never leave val or test empty when there is enough to go round
        for i in np.flatnonzero((counts == 0) & (weights > 0)):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    return counts.tolist()


def _assign_in_order(keys: list[str], fractions: Mapping[str, float]) -> dict[str, str]:
    out: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, _counts(len(keys), fractions), strict=True):
        for key in keys[start:start + count]:
            out[key] = split
        start += count
    return out


def split_table(table: pd.DataFrame, fractions: Mapping[str, float], seed: int, min_patients: int = 3) -> pd.DataFrame:
    """Return ``table`` with ``split`` and ``split_method`` columns ("patient" or "region")."""
    parts = []
    for modality, group in table.groupby("modality", sort=True):
        group = group.copy()
        patients = sorted(group["patient_key"].unique(), key=lambda k: _stable_rank(seed, k))
        if len(patients) >= max(min_patients, len(SPLITS)):
            by_patient = _assign_in_order(patients, fractions)
            group["split"] = group["patient_key"].map(by_patient)
            group["split_method"] = "patient"
        else:
            group["split"] = None
            group["split_method"] = "region"
            order = group.sort_values(["path", "frame", "tile_y", "tile_x"], na_position="first")
            for _, source in order.groupby("path", sort=True):
                # Contiguous blocks in scan order keep neighbouring tiles/slices together.
                by_region = _assign_in_order(list(source["id"]), fractions) if len(source) >= len(SPLITS) else {
                    i: "train" for i in source["id"]}
                group.loc[source.index, "split"] = source["id"].map(by_region)
        parts.append(group)
    if not parts:
        return table.assign(split=pd.Series(dtype=str), split_method=pd.Series(dtype=str))
    return pd.concat(parts).sort_values("id").reset_index(drop=True)


def leaked_patients(table: pd.DataFrame) -> list[str]:
    """Patient keys that appear in more than one split among rows split by patient."""
    by_patient = table[table["split_method"] == "patient"].groupby("patient_key")["split"].nunique()
    return sorted(by_patient[by_patient > 1].index)
