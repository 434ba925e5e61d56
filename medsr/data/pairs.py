"""Pair storage: LR/HR image pairs of varied sizes, memory-mapped for fast random patches.

A pair set is one folder (``data/pairs/<split>/x<scale>/<kind>``) holding

* ``lr.npy``: every LR image of the set, flattened and concatenated (float32: the realistic
  track's LR is noisy, so it has no smaller exact type), so that ``np.load(mmap_mode="r")`` gives
  random access without reading the whole file;
* the HR images: either slices of the stored tiles' shards (:mod:`medsr.data.shards`, in the
  source's own type), hard-linked into the folder from ``data/interim`` so that they cost no
  bytes a second time, or, for a set written from arrays, a float32 ``hr.npy`` like ``lr.npy``;
* ``index.json``: per pair its id, modality, offsets and shapes, plus the set's attributes. An HR
  is ``hr_file`` at ``hr_offset``, stored as ``hr_tile`` (rows, cols), of which the top-left
  ``hr_shape`` is the image (a tile cropped to a multiple of the scale).

A linked shard also holds tiles of other splits; the index names only this set's, and nothing
reads a tile the index does not name. One flat array per file, rather than one file per image,
keeps a DataLoader worker's random patch read to a single memory-mapped slice; npz/zarr would
need decompression per read.

A tile set (``data/pairs/train/hr``) is the same format with the HR side only: the training
tiles, which :class:`medsr.training.data.PatchBatches` degrades patch by patch as it draws them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsr.atomic import atomic_dir
from medsr.data import check_contract
from medsr.data.shards import FlatArrayFile, ShardReader, StoredTile, TileRef, decode

HR_ARRAYS = "hr.npy"  # the HR of a set written from arrays


@dataclass(frozen=True)
class PairItem:
    id: str
    modality: str
    hr: np.ndarray | None  # (1, H, W) float32; None where the set's HR comes from stored tiles (write_pairs hr_tiles)
    lr: np.ndarray  # (1, H/scale, W/scale) float32
    degradation: dict[str, float] | None = None  # the blur/noise this pair's LR was made with, when drawn


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links (some network shares)
        shutil.copyfile(source, target)


class _HrWriter:
    """The HR side of a set being written into ``folder``: arrays go to a float32 ``hr.npy``,
    stored tiles are referenced in their shard, which is linked into the folder once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._arrays: FlatArrayFile | None = None
        self._linked: dict[str, Path] = {}

    def add(self, name: str, hr: np.ndarray | TileRef, multiple: int = 1) -> dict[str, Any]:
        """Index fields of one HR: ``hr`` an array (written) or a stored tile (cropped to ``multiple``)."""
        if isinstance(hr, TileRef):
            h, w = hr.height - hr.height % multiple, hr.width - hr.width % multiple
            if h == 0 or w == 0:
                raise ValueError(f"{name}: tile {hr.height}x{hr.width} is smaller than {multiple} pixels on a side")
            source = self._linked.setdefault(hr.file.name, hr.file)
            if source != hr.file:
                raise ValueError(f"{name}: shards {source} and {hr.file} share a name")
            if not (self.folder / hr.file.name).exists():
                _link_or_copy(hr.file, self.folder / hr.file.name)
            return {"hr_file": hr.file.name, "hr_offset": hr.offset, "hr_tile": [hr.height, hr.width],
                    "hr_shape": [h, w]}
        check_contract(hr, f"{name} (HR)")
        if self._arrays is None:
            self._arrays = FlatArrayFile(self.folder / HR_ARRAYS)
        h, w = hr.shape[-2:]
        return {"hr_file": HR_ARRAYS, "hr_offset": self._arrays.append(hr), "hr_tile": [h, w], "hr_shape": [h, w]}

    def close(self) -> None:
        if self._arrays is not None:
            self._arrays.close()


def write_pairs(folder: str | Path, items: Iterable[PairItem], scale: int, attrs: dict[str, Any] | None = None, *,
                hr_tiles: Sequence[TileRef] | None = None) -> int:
    """Write a pair set atomically; returns the number of pairs written.

    Pairs are written as they arrive, so a parallel producer's next pairs are computed while this
    one's are on their way to disk, and memory holds one pair rather than the set.

    ``hr_tiles``: the stored tile of each item, in order; the HR is then that tile cropped to a
    multiple of ``scale`` (what the LR was made from), referenced in its linked shard, and the
    items' ``hr`` is not read (it may be None). Without it the items' HR arrays are written.
    """
    index: list[dict[str, Any]] = []
    with atomic_dir(folder) as tmp:
        hr_writer = _HrWriter(tmp)
        lr_file = FlatArrayFile(tmp / "lr.npy")
        try:
            for item in items:
                check_contract(item.lr, f"{item.id} (LR)")
                lh, lw = item.lr.shape[-2:]
                if hr_tiles is not None and len(index) >= len(hr_tiles):
                    raise ValueError(f"{folder}: more pairs than the {len(hr_tiles)} stored tiles given for their HR")
                hr_source = hr_tiles[len(index)] if hr_tiles is not None else item.hr
                if hr_source is None:
                    raise ValueError(f"{item.id}: no HR image and no stored tile for it")
                hr_fields = hr_writer.add(item.id, hr_source, scale)
                h, w = hr_fields["hr_shape"]
                if (lh * scale, lw * scale) != (h, w):
                    raise ValueError(f"{item.id}: LR {lh}x{lw} times scale {scale} is not HR {h}x{w}")
                entry = {"id": item.id, "modality": item.modality, **hr_fields,
                         "lr_offset": lr_file.append(item.lr), "lr_shape": [lh, lw]}
                if item.degradation is not None:
                    entry["degradation"] = {k: round(float(v), 6) for k, v in item.degradation.items()}
                index.append(entry)
        finally:
            hr_writer.close()
            lr_file.close()
        if hr_tiles is not None and len(index) != len(hr_tiles):
            raise ValueError(f"{folder}: {len(index)} pairs for {len(hr_tiles)} stored tiles")
        meta = {"scale": scale, "count": len(index), "attrs": attrs or {}, "pairs": index}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return len(index)


def write_tiles(folder: str | Path, items: Iterable[tuple[str, str, np.ndarray | TileRef]],
                attrs: dict[str, Any] | None = None) -> int:
    """Write a tile set (HR only) atomically from ``(id, modality, pixels or stored tile)``; returns
    the count. Stored tiles are referenced in their shards (linked, not copied)."""
    index: list[dict[str, Any]] = []
    with atomic_dir(folder) as tmp:
        hr_writer = _HrWriter(tmp)
        try:
            for tile_id, modality, hr in items:
                index.append({"id": tile_id, "modality": modality, **hr_writer.add(tile_id, hr)})
        finally:
            hr_writer.close()
        meta = {"scale": 1, "count": len(index), "attrs": attrs or {}, "pairs": index}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return len(index)


class TileSet:
    """Read-only view of a tile set (or the HR side of a pair set); cheap to pickle into DataLoader
    workers (maps lazily)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no pair set here; run `dvc repro degrade` first")
        meta = json.loads(index_path.read_text())
        self.scale: int = int(meta["scale"])
        self.attrs: dict[str, Any] = meta.get("attrs", {})
        self.pairs: list[dict[str, Any]] = meta["pairs"]
        self._reader = ShardReader()
        self._lr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"], state["_lr"] = ShardReader(), None  # each worker maps the files itself
        return state

    def modalities(self) -> list[str]:
        return sorted({p["modality"] for p in self.pairs})

    def _hr_stored(self, i: int) -> np.ndarray:
        p = self.pairs[i]
        th, tw = p["hr_tile"]
        h, w = p["hr_shape"]
        return self._reader.stored(TileRef(self.folder / p["hr_file"], int(p["hr_offset"]), th, tw))[:, :h, :w]

    def hr_view(self, i: int) -> StoredTile:
        """Image ``i`` as a read-only memory-mapped ``(1, H, W)`` view: slicing it reads and decodes
        only that part, as float32."""
        return StoredTile(self._hr_stored(i))

    def hr(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 ``(1, H, W)`` (the array contract)."""
        return np.ascontiguousarray(decode(self._hr_stored(i)))


class PairSet(TileSet):
    """Read-only view of a pair set: a tile set with an LR image per HR image."""

    def lr(self, i: int) -> np.ndarray:
        if self._lr is None:
            self._lr = np.load(self.folder / "lr.npy", mmap_mode="r")
        p = self.pairs[i]
        h, w = p["lr_shape"]
        return np.asarray(self._lr[p["lr_offset"]:p["lr_offset"] + h * w]).reshape(1, h, w)

    def patch(self, i: int, lr_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random aligned (LR, HR) patch; LR side ``lr_size`` (clipped to the image)."""
        p = self.pairs[i]
        lh, lw = p["lr_shape"]
        s = self.scale
        ph, pw = min(lr_size, lh), min(lr_size, lw)
        y = int(rng.integers(0, lh - ph + 1))
        x = int(rng.integers(0, lw - pw + 1))
        lr = self.lr(i)[:, y:y + ph, x:x + pw]
        hr = self.hr_view(i)[:, y * s:(y + ph) * s, x * s:(x + pw) * s]
        return np.ascontiguousarray(lr), np.ascontiguousarray(hr)
