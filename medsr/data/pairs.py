"""Pair storage: LR/HR image pairs of varied sizes, memory-mapped for fast random patches.

A pair set is one folder (``data/pairs/<split>/x<scale>/<kind>``) holding

* ``hr.npy`` and ``lr.npy``: every image of the set, flattened and concatenated (float32),
  so that ``np.load(mmap_mode="r")`` gives random access without reading the whole file;
* ``index.json``: per pair its id, modality, offsets and shapes, plus the set's attributes.

One flat array per side, rather than one file per image, keeps a DataLoader worker's random
patch read to a single memory-mapped slice; npz/zarr would need decompression per read.
For the self-supervised set (kind ``ssl``) "hr" holds the LR image and "lr" the VLR image.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsr.atomic import atomic_dir
from medsr.data import check_contract


@dataclass(frozen=True)
class PairItem:
    id: str
    modality: str
    hr: np.ndarray  # (1, H, W) float32 (None only on its way from a pool worker: pairing._make_pair_without_hr)
    lr: np.ndarray  # (1, H/scale, W/scale) float32
    degradation: dict[str, float] | None = None  # the blur/noise this pair's LR was made with, when drawn


def write_pairs(folder: str | Path, items: Iterable[PairItem], scale: int, attrs: dict[str, Any] | None = None) -> int:
    """Write a pair set atomically; returns the number of pairs written."""
    items = list(items)
    index: list[dict[str, Any]] = []
    hr_off = lr_off = 0
    for item in items:
        check_contract(item.hr, f"{item.id} (HR)")
        check_contract(item.lr, f"{item.id} (LR)")
        h, w = item.hr.shape[-2:]
        lh, lw = item.lr.shape[-2:]
        if (lh * scale, lw * scale) != (h, w):
            raise ValueError(f"{item.id}: LR {lh}x{lw} times scale {scale} is not HR {h}x{w}")
        entry = {"id": item.id, "modality": item.modality, "hr_offset": hr_off, "hr_shape": [h, w],
                 "lr_offset": lr_off, "lr_shape": [lh, lw]}
        if item.degradation is not None:
            entry["degradation"] = {k: round(float(v), 6) for k, v in item.degradation.items()}
        index.append(entry)
        hr_off += h * w
        lr_off += lh * lw
    hr_flat = np.concatenate([i.hr.ravel() for i in items]) if items else np.zeros(0, np.float32)
    lr_flat = np.concatenate([i.lr.ravel() for i in items]) if items else np.zeros(0, np.float32)
    with atomic_dir(folder) as tmp:
        np.save(tmp / "hr.npy", hr_flat.astype(np.float32, copy=False), allow_pickle=False)
        np.save(tmp / "lr.npy", lr_flat.astype(np.float32, copy=False), allow_pickle=False)
        meta = {"scale": scale, "count": len(items), "attrs": attrs or {}, "pairs": index}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return len(items)


class PairSet:
    """Read-only view of a pair set; cheap to pickle into DataLoader workers (maps lazily)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no pair set here; run `dvc repro degrade` first")
        meta = json.loads(index_path.read_text())
        self.scale: int = int(meta["scale"])
        self.attrs: dict[str, Any] = meta.get("attrs", {})
        self.pairs: list[dict[str, Any]] = meta["pairs"]
        self._hr: np.ndarray | None = None
        self._lr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hr"] = state["_lr"] = None  # each worker maps the files itself
        return state

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._hr is None or self._lr is None:
            self._hr = np.load(self.folder / "hr.npy", mmap_mode="r")
            self._lr = np.load(self.folder / "lr.npy", mmap_mode="r")
        return self._hr, self._lr

    def modalities(self) -> list[str]:
        return sorted({p["modality"] for p in self.pairs})

    def hr(self, i: int) -> np.ndarray:
        p = self.pairs[i]
        h, w = p["hr_shape"]
        return np.asarray(self._maps()[0][p["hr_offset"]:p["hr_offset"] + h * w]).reshape(1, h, w)

    def lr(self, i: int) -> np.ndarray:
        p = self.pairs[i]
        h, w = p["lr_shape"]
        return np.asarray(self._maps()[1][p["lr_offset"]:p["lr_offset"] + h * w]).reshape(1, h, w)

    def patch(self, i: int, lr_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random aligned (LR, HR) patch; LR side ``lr_size`` (clipped to the image)."""
        p = self.pairs[i]
        lh, lw = p["lr_shape"]
        s = self.scale
        ph, pw = min(lr_size, lh), min(lr_size, lw)
        y = int(rng.integers(0, lh - ph + 1))
        x = int(rng.integers(0, lw - pw + 1))
        lr = self.lr(i)[:, y:y + ph, x:x + pw]
        hr = self.hr(i)[:, y * s:(y + ph) * s, x * s:(x + pw) * s]
        return np.ascontiguousarray(lr), np.ascontiguousarray(hr)
