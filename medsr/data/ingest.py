"""Ingest: load every raw file once (windowing applied here and only here), tile, and build the
metadata table, one row per image, that validation, split and degrade read.

A file that cannot be loaded still gets a row, with ``error`` set, so that validation can
quarantine it with its reason instead of the whole stage failing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsr.atomic import atomic_dir
from medsr.data import MODALITIES
from medsr.data.loading import LoadError, load_image
from medsr.data.tiling import tile_image

TABLE_NAME = "images.parquet"
IMAGES_DIR = "images"

TABLE_COLUMNS = [
    "id", "patient_key", "modality", "source", "path", "frame", "tile_y", "tile_x", "height", "width",
    "original_dtype", "min", "max", "std", "raw_min", "raw_max", "spacing_row", "spacing_col",
    "window_low", "window_high", "window_method", "window_inverted", "sha256", "array", "error",
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
    table = pd.read_csv(csv, dtype=str)
    return dict(zip(table["path"], table["patient_id"], strict=True))


def raw_files(modality_dir: Path) -> list[Path]:
    files = []
    for path in sorted(modality_dir.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() in {".json", ".csv", ".txt", ".md"}:
            continue
        files.append(path)
    return files


def ingest(raw_root: Path, out_dir: Path, options: IngestOptions, sources: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Load, tile and tabulate every file under ``raw_root/<modality>/``; writes ``out_dir`` atomically."""
    rows: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        images_dir = tmp / IMAGES_DIR
        images_dir.mkdir()
        for modality in MODALITIES:
            modality_dir = raw_root / modality
            if not modality_dir.is_dir():
                continue
            patient_ids = read_patient_ids(modality_dir)
            source_kind = (sources or {}).get(modality, "unknown")
            files = raw_files(modality_dir)
            for path in tqdm(files, desc=f"ingest {modality}", unit="file", leave=False):
                rel = path.relative_to(raw_root).as_posix()
                rows.extend(_ingest_file(path, rel, modality, source_kind, modality_dir, patient_ids, options, images_dir))
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        table.to_parquet(tmp / TABLE_NAME, index=False)
    return table


def _ingest_file(path: Path, rel: str, modality: str, source_kind: str, modality_dir: Path,
                 patient_ids: Mapping[str, str], options: IngestOptions, images_dir: Path) -> list[dict[str, Any]]:
    base = {column: None for column in TABLE_COLUMNS}
    base.update(modality=modality, source=source_kind, path=rel)
    try:
        # Thinning applies to NIfTI volumes, whose 1 mm neighbours are near duplicates; a multi-frame
        # DICOM's few frames are all kept.
        is_volume = path.name.lower().endswith((".nii", ".nii.gz"))
        images = load_image(path, modality, root=modality_dir, patient_ids=patient_ids, max_pixels=options.max_pixels,
                            slice_step=options.slice_step if is_volume else 1,
                            min_foreground_fraction=options.min_foreground_fraction)
    except LoadError as err:
        return [{**base, "id": image_id(modality, rel, None, -1, -1), "error": str(LoadError(rel, err.reason, err.fix, err.detail))}]
    if not images:
        return [{**base, "id": image_id(modality, rel, None, -1, -1), "error": f"{rel}: no usable slice (all below the foreground threshold)"}]
    rows = []
    for image in images:
        for y, x, tile in tile_image(image, options.tile_size):
            pixels = tile.pixels
            ident = image_id(modality, rel, image.frame, y, x)
            np.save(images_dir / f"{ident}.npy", pixels, allow_pickle=False)
            spacing = image.spacing or (None, None)
            rows.append({
                **base,
                "id": ident, "patient_key": image.patient_key, "frame": image.frame, "tile_y": y, "tile_x": x,
                "height": int(pixels.shape[1]), "width": int(pixels.shape[2]), "original_dtype": image.original_dtype,
                "min": float(pixels.min()), "max": float(pixels.max()), "std": float(pixels.std()),
                "raw_min": image.extra.get("raw_min"), "raw_max": image.extra.get("raw_max"),
                "spacing_row": spacing[0], "spacing_col": spacing[1],
                "window_low": image.window.low, "window_high": image.window.high,
                "window_method": image.window.method, "window_inverted": image.window.inverted,
                "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(), "array": f"{IMAGES_DIR}/{ident}.npy",
            })
    return rows
