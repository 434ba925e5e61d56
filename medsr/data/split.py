"""Deterministic train/val/test split that never lets a test image sit beside a training one.

A result counts only on images the model never saw, so the unit that goes to one split is as
large as the data allow (the method is recorded per row in ``split_method``):

* ``patient``: a modality with at least ``min_patients`` patients is split by patient key, in a
  seeded order; every image of a patient goes to one split.
* ``file``: fewer patients but two or more source files (series, volumes): whole files go to
  test and val, never tiles or frames of a file whose other parts train. Training needs the
  bulk, so the largest files (in pixels) train; with exactly two files the smaller one is the
  test file and val is cut from the training file by region (below), when its size allows.
* ``region``: one file only (the embedded chest radiograph). Its tiles or slices are cut into
  blocks, and the blocks are separated by a gap of at least one tile or slice that no split uses
  (``split == "gap"``), so no test tile touches a training tile, not even at a corner:

  - five or more frames/slices: blocks along the frame axis, ``train | gap | val | gap | test``;
  - one frame cut into a grid of at least 3x3 tiles: the top rows train; below a gap row the
    bottom band is split left/right into val and test with a gap column between them;
  - otherwise bands of whole tile rows (or columns) along the longer axis, like the frames;
  - too small for that: every unit trains and the modality has no val/test from this file.

:func:`find_leaks` checks every method (no patient of a patient split, no file of a file split,
no neighbouring region of a region split in two splits); the split stage refuses to write a
table it finds a leak in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")
GAP = "gap"  # region units no split uses: the margin between training and held-out blocks
METHODS: tuple[str, ...] = ("patient", "file", "region")


def _stable_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()


def _counts(n: int, fractions: Mapping[str, float], splits: tuple[str, ...] = SPLITS) -> list[int]:
    """Exact per-split counts (largest remainder), each split with a positive fraction non-empty when n allows."""
    weights = np.array([float(fractions.get(s, 0.0)) for s in splits])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative and not all zero, got {dict(fractions)}")
    raw = weights / weights.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= int((weights > 0).sum()):  # never leave a wanted split empty when there is enough to go round
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


def _unit_coords(rows: pd.DataFrame) -> pd.DataFrame:
    """Rank of each row's frame, tile row and tile column within its file (0-based, dense)."""
    frame = rows["frame"].astype(float).fillna(-1.0)
    return pd.DataFrame({
        "f": frame.rank(method="dense").astype(int) - 1,
        "r": rows["tile_y"].astype(float).fillna(0).rank(method="dense").astype(int) - 1,
        "c": rows["tile_x"].astype(float).fillna(0).rank(method="dense").astype(int) - 1,
    }, index=rows.index)


def _blocks_with_gaps(n: int, fractions: Mapping[str, float]) -> list[str] | None:
    """Labels for ``n`` units in a line: contiguous blocks in SPLITS order with one gap unit between blocks."""
    wanted = [s for s in SPLITS if float(fractions.get(s, 0.0)) > 0]
    usable = n - (len(wanted) - 1)
    if len(wanted) < 2 or usable < len(wanted):
        return None
    counts = dict(zip(wanted, _counts(usable, fractions, tuple(wanted)), strict=True))
    labels: list[str] = []
    for i, split in enumerate(wanted):
        if i:
            labels.append(GAP)
        labels += [split] * counts[split]
    return labels


def _region_labels(rows: pd.DataFrame, fractions: Mapping[str, float]) -> pd.Series:
    """Split one file's units into blocks separated by gaps (module docstring); all train if too small."""
    coords = _unit_coords(rows)
    n_frames, n_rows, n_cols = (int(coords[a].max()) + 1 for a in ("f", "r", "c"))
    held_out = [s for s in ("val", "test") if float(fractions.get(s, 0.0)) > 0]
    labels = pd.Series("train", index=rows.index, dtype=object)
    if n_frames >= 2:
        line = _blocks_with_gaps(n_frames, fractions)
        if line is not None:
            return coords["f"].map(dict(enumerate(line)))
        return labels
    train_share = float(fractions.get("train", 0.0))
    held_share = sum(float(fractions[s]) for s in held_out)
    if held_out and n_rows >= 3 and n_cols >= (3 if len(held_out) == 2 else 1) and train_share > 0:
        band = min(max(1, round(n_rows * held_share / (held_share + train_share))), n_rows - 2)
        first_band_row = n_rows - band
        if len(held_out) == 1:
            column_split = {c: held_out[0] for c in range(n_cols)}
        else:
            val_cols = min(max(1, round((n_cols - 1) * float(fractions["val"]) / held_share)), n_cols - 2)
            column_split = {c: "val" if c < val_cols else GAP if c == val_cols else "test" for c in range(n_cols)}
        return pd.Series([
            "train" if r < first_band_row - 1 else GAP if r == first_band_row - 1 else column_split[c]
            for r, c in zip(coords["r"], coords["c"], strict=True)], index=rows.index, dtype=object)
    axis = "r" if n_rows >= n_cols else "c"
    line = _blocks_with_gaps(max(n_rows, n_cols), fractions)
    if line is not None:  # bands across the whole other axis, so a gap band separates them completely
        return coords[axis].map(dict(enumerate(line)))
    return labels


def _file_sizes(group: pd.DataFrame) -> dict[str, int]:
    """Pixels per file (images when the table has no sizes): what "the largest files train" measures.

    Pixels, not image counts: 19 small slices of a template volume hold less to learn from than 16
    full tiles of a real scan.
    """
    if {"height", "width"} <= set(group.columns):
        return (group["height"].astype(int) * group["width"].astype(int)).groupby(group["path"]).sum().to_dict()
    return group.groupby("path").size().to_dict()


def _size_then_seed(seed: int, sizes: Mapping[str, int]) -> list[str]:
    return sorted(sizes, key=lambda k: (-sizes[k], _stable_rank(seed, k)))


def split_table(table: pd.DataFrame, fractions: Mapping[str, float], seed: int, min_patients: int = 3) -> pd.DataFrame:
    """Return ``table`` with ``split`` (train/val/test/gap) and ``split_method`` (patient/file/region) columns."""
    _counts(len(SPLITS), fractions)  # validates the fractions once, whatever the data
    parts = []
    for _modality, group in table.groupby("modality", sort=True):
        group = group.copy()
        patients = sorted(group["patient_key"].unique(), key=lambda k: _stable_rank(seed, k))
        files = _file_sizes(group)
        if len(patients) >= max(min_patients, len(SPLITS)):
            group["split"] = group["patient_key"].map(_assign_in_order(patients, fractions))
            group["split_method"] = "patient"
        elif len(files) >= len(SPLITS):
            ordered = _size_then_seed(seed, files)
            n_train = _counts(len(ordered), fractions)[0]
            # The largest files train; the rest go to val and test in a seeded order.
            rest = sorted(ordered[n_train:], key=lambda k: _stable_rank(seed, k))
            held = {f: s for f, s in zip(rest, _held_out_order(len(rest), fractions), strict=True)}
            group["split"] = group["path"].map({**{f: "train" for f in ordered[:n_train]}, **held})
            group["split_method"] = "file"
        elif len(files) == 2:
            big, small = _size_then_seed(seed, files)
            group["split"] = None
            group["split_method"] = "file"
            group.loc[group["path"] == small, "split"] = "test"
            big_rows = group[group["path"] == big]
            labels = _region_labels(big_rows, {"train": fractions["train"], "val": fractions["val"]})
            group.loc[big_rows.index, "split"] = labels
            if (labels != "train").any():
                group.loc[big_rows.index, "split_method"] = "region"
        else:
            group["split"] = _region_labels(group, fractions)
            group["split_method"] = "region"
        parts.append(group)
    if not parts:
        return table.assign(split=pd.Series(dtype=str), split_method=pd.Series(dtype=str))
    return pd.concat(parts).sort_values("id").reset_index(drop=True)


def _held_out_order(n: int, fractions: Mapping[str, float]) -> list[str]:
    """``n`` held-out files shared between val and test by their fractions, val first."""
    counts = _counts(n, {"val": fractions.get("val", 0.0), "test": fractions.get("test", 0.0)}, ("val", "test"))
    return ["val"] * counts[0] + ["test"] * counts[1]


def find_leaks(table: pd.DataFrame) -> list[str]:
    """Every way an image of one split sits in or beside another split, as readable lines (empty: no leak).

    Checks: a patient of a ``patient`` split in two splits; a file whose rows are not region-split
    in two splits; two units of a region-split file in different splits that are neighbours
    (frame, tile row and tile column each within one of the other's, i.e. no gap between them).
    """
    leaks: list[str] = []
    used = table[table["split"].isin(SPLITS)]
    by_patient = used[used["split_method"] == "patient"].groupby("patient_key")["split"].nunique()
    leaks += [f"patient {key} is in {n} splits" for key, n in by_patient[by_patient > 1].items()]
    for path, rows in table.groupby("path", sort=True):
        rows_used = rows[rows["split"].isin(SPLITS)]
        if rows_used["split"].nunique() <= 1:
            continue
        if not (rows_used["split_method"] == "region").all():
            leaks.append(f"file {path} is in splits {sorted(rows_used['split'].unique())} without a region split")
            continue
        coords = _unit_coords(rows).loc[rows_used.index].to_numpy()
        splits = rows_used["split"].to_numpy()
        for i in range(len(coords)):
            near = (np.abs(coords - coords[i]).max(axis=1) <= 1) & (splits != splits[i])
            if near.any():
                j = int(np.flatnonzero(near)[0])
                leaks.append(f"file {path}: a {splits[i]} unit {tuple(coords[i])} touches a {splits[j]} unit "
                             f"{tuple(coords[j])} with no gap between them")
                break
    return leaks


def leaked_patients(table: pd.DataFrame) -> list[str]:
    """Patient keys that appear in more than one split among rows split by patient."""
    used = table[table["split"].isin(SPLITS)]
    by_patient = used[used["split_method"] == "patient"].groupby("patient_key")["split"].nunique()
    return sorted(by_patient[by_patient > 1].index)


def file_label(path: str, source: str) -> str:
    """How a report names a source file: its path for the embedded sample, a stable hash otherwise.

    NIH file names carry patient numbers and a user's own files may carry names, so only the
    sample's (public, identifier-free) paths are shown; the hash still shows which rows share a file.
    """
    if source == "sample":
        return path
    return "file-" + hashlib.sha256(path.encode()).hexdigest()[:10]


def files_per_split(table: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """``{modality: {split: [file label, ...]}}`` (:func:`file_label`), gap included, for the summary."""
    out: dict[str, dict[str, list[str]]] = {}
    for (modality, split), rows in table.groupby(["modality", "split"], sort=True):
        sources = rows["source"] if "source" in rows else ["unknown"] * len(rows)
        labels = {file_label(str(p), str(s)) for p, s in zip(rows["path"], sources, strict=True)}
        out.setdefault(str(modality), {})[str(split)] = sorted(labels)
    return out


def empty_splits(table: pd.DataFrame, fractions: Mapping[str, float]) -> list[str]:
    """One line per modality with images whose test split, or (from 3 files on) val split, is empty.

    Two files split whole-file into train and test by design (the sample's CT): val is wanted
    only where there are files enough for it; a test split is always wanted (positive fractions).
    """
    problems = []
    for modality in sorted(table["modality"].unique()):
        rows = table[table["modality"] == modality]
        wanted = ("val", "test") if rows["path"].nunique() >= 3 else ("test",)
        empty = [name for name in wanted if float(fractions.get(name, 0)) > 0 and not (rows["split"] == name).any()]
        if empty:
            problems.append(f"{modality}: {len(rows)} image(s) in {rows['path'].nunique()} file(s) after validation, "
                            f"none in {' or '.join(empty)}")
    return problems
