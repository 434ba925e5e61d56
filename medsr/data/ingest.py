"""Ingest: load every raw file once (windowing applied here and only here), tile, and build the
metadata table, one row per image, that validation, split and degrade read.

A file that cannot be loaded still gets a row, with ``error`` set, so that validation can
quarantine it with its reason instead of the whole stage failing.

Tiles are stored in their source's sample type, packed into shards (:mod:`medsr.data.shards`);
each row names its tile's shard (``array``), ``offset`` and ``stored_dtype``, and
:func:`medsr.data.shards.read_tile` gives the float32 contract pixels back.

Files are independent, so ``workers`` local processes (or a Dask cluster) load and tile them in
parallel and return their rows and stored tiles; this process appends them to the shards in file
order, never completion order: the outputs are byte-identical whatever the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from medsr.atomic import atomic_dir
from medsr.data import MODALITIES
from medsr.data.loading import LoadError, load_image
from medsr.data.parallel import parallel_mapper
from medsr.data.shards import SHARD_BYTES, ShardWriter, encode, tile_digest
from medsr.data.tiling import tile_image

if TYPE_CHECKING:
    import pandas as pd

TABLE_NAME = "images.parquet"
SHARDS_DIR = "shards"

TABLE_COLUMNS = [
    "id", "patient_key", "modality", "source", "path", "frame", "tile_y", "tile_x", "height", "width",
    "original_dtype", "min", "max", "std", "raw_min", "raw_max", "spacing_row", "spacing_col",
    "window_low", "window_high", "window_method", "window_inverted", "sha256", "array", "offset", "stored_dtype", "error",
]


@dataclass(frozen=True)
class IngestOptions:
    tile_size: int = 256
    max_pixels: int = 100_000_000
    slice_step: int = 1
    min_foreground_fraction: float = 0.0

    @classmethod
    def from_params(cls, data: Mapping[str, Any]) -> IngestOptions:
        return cls(
            tile_size=int(data["tile_size"]),
            max_pixels=int(data["max_pixels"]),
            slice_step=int(data.get("volume_slice_step", 1)),
            min_foreground_fraction=float(data.get("min_foreground_fraction", 0.0)),
        )


def image_id(modality: str, path: str, frame: int | None, y: int, x: int) -> str:
    """Stable id from where the pixels came from; hashed so no file name (NIH names hold patient numbers) shows."""
    digest = hashlib.sha256(f"{path}|{frame}|{y}|{x}".encode()).hexdigest()[:16]
    return f"{modality}-{digest}"


def read_patient_ids(modality_dir: Path) -> dict[str, str]:
    """``patients.csv`` (path, patient_id) written by a download that knows patients (NIH)."""
    csv = modality_dir / "patients.csv"
    if not csv.is_file():
        return {}
    import pandas as pd  # here, not at the top: worker processes import this module and never need pandas

    table = pd.read_csv(csv, dtype=str)
    return dict(zip(table["path"], table["patient_id"], strict=True))


def raw_files(modality_dir: Path) -> list[Path]:
    files = []
    for path in sorted(modality_dir.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() in {".json", ".csv", ".txt", ".md"}:
            continue
        files.append(path)
    return files


@dataclass(frozen=True)
class FileTask:
    """One raw file's work order: small, so it pickles cheaply to a worker process or Dask worker.

    Paths are absolute (a Dask worker's working directory is not ours); ``patient_ids`` holds only
    this file's entries, not the whole (possibly 100k-row) table.
    """

    path: Path
    rel: str  # relative to the raw root, POSIX: what the table and error messages show
    modality: str
    source_kind: str
    modality_dir: Path
    patient_ids: Mapping[str, str]


def file_tasks(raw_root: Path, sources: Mapping[str, str] | None = None) -> list[FileTask]:
    """Every raw file under ``raw_root/<modality>/``, in the table's order (modality, then path)."""
    raw_root = Path(raw_root).absolute()
    tasks = []
    for modality in MODALITIES:
        modality_dir = raw_root / modality
        if not modality_dir.is_dir():
            continue
        patient_ids = read_patient_ids(modality_dir)
        source_kind = (sources or {}).get(modality, "unknown")
        for path in raw_files(modality_dir):
            # The loader looks a file up by its path under the modality folder, then by its name.
            keys = (path.relative_to(modality_dir).as_posix(), path.name)
            tasks.append(FileTask(path, path.relative_to(raw_root).as_posix(), modality, source_kind, modality_dir,
                                  {k: patient_ids[k] for k in keys if k in patient_ids}))
    return tasks


def ingest(raw_root: Path, out_dir: Path, options: IngestOptions, sources: Mapping[str, str] | None = None, *,
           workers: int = 1, dask_address: str | None = None, shard_bytes: int = SHARD_BYTES) -> pd.DataFrame:
    """Load, tile and tabulate every file under ``raw_root/<modality>/``; writes ``out_dir`` atomically.

    ``workers`` local processes share the files, or the Dask cluster at ``dask_address`` does (its
    workers must see ``raw_root`` at the same absolute path). The table and shards are the same
    bytes either way; a shard holds at most ``shard_bytes``.
    """
    if workers < 1:
        raise ValueError(f"data.workers must be >= 1, got {workers}")
    import pandas as pd

    tasks = file_tasks(raw_root, sources)
    rows: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        (tmp / SHARDS_DIR).mkdir()
        shards = ShardWriter(tmp / SHARDS_DIR, prefix=f"{SHARDS_DIR}/", shard_bytes=shard_bytes)
        work = partial(_ingest_file, options=options)
        try:
            with parallel_mapper(workers, dask_address) as mapper:
                # The mapper yields in task order, so tiles and rows are in file order whoever finished first.
                for file_rows in tqdm(mapper(work, tasks), total=len(tasks), desc="ingest", unit="file", leave=False):
                    for row, stored in file_rows:
                        if stored is not None:
                            row["array"], row["offset"] = shards.append(stored)
                        rows.append(row)
        finally:
            shards.close()
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        table["offset"] = table["offset"].astype("Int64")  # no offset (a file that failed to load): <NA>
        table.to_parquet(tmp / TABLE_NAME, index=False)
    return table


def _ingest_file(task: FileTask, *, options: IngestOptions) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    """Load and tile one file; returns its table rows, each with its stored tile (None for an error row).

    The row's ``array`` and ``offset`` are filled in by the writing process."""
    path, rel, modality = task.path, task.rel, task.modality
    base = {column: None for column in TABLE_COLUMNS}
    base.update(modality=modality, source=task.source_kind, path=rel)
    try:
        # Thinning applies to NIfTI volumes, whose 1 mm neighbours are near duplicates; a multi-frame
        # DICOM's few frames are all kept.
        is_volume = path.name.lower().endswith((".nii", ".nii.gz"))
        images = load_image(path, modality, root=task.modality_dir, patient_ids=task.patient_ids,
                            max_pixels=options.max_pixels, slice_step=options.slice_step if is_volume else 1,
                            min_foreground_fraction=options.min_foreground_fraction)
    except LoadError as err:
        # A library's message can quote the absolute path: show the relative one, as the table does,
        # so the row does not depend on where the raw folder lies.
        detail = err.detail.replace(str(path), rel)
        return [({**base, "id": image_id(modality, rel, None, -1, -1),
                  "error": str(LoadError(rel, err.reason, err.fix, detail))}, None)]
    if not images:
        return [({**base, "id": image_id(modality, rel, None, -1, -1),
                  "error": f"{rel}: no usable slice (all below the foreground threshold)"}, None)]
    rows = []
    for image in images:
        for y, x, tile in tile_image(image, options.tile_size):
            pixels = tile.pixels
            stored = encode(pixels)
            ident = image_id(modality, rel, image.frame, y, x)
            spacing = image.spacing or (None, None)
            # min/max/std describe the loader's pixels, so a NaN or out-of-range value still fails validation.
            rows.append(({
                **base,
                "id": ident, "patient_key": image.patient_key, "frame": image.frame, "tile_y": y, "tile_x": x,
                "height": int(pixels.shape[1]), "width": int(pixels.shape[2]), "original_dtype": image.original_dtype,
                "min": float(pixels.min()), "max": float(pixels.max()), "std": float(pixels.std()),
                "raw_min": image.extra.get("raw_min"), "raw_max": image.extra.get("raw_max"),
                "spacing_row": spacing[0], "spacing_col": spacing[1],
                "window_low": image.window.low, "window_high": image.window.high,
                "window_method": image.window.method, "window_inverted": image.window.inverted,
                "sha256": tile_digest(stored), "stored_dtype": stored.dtype.name,
            }, stored))
    return rows
