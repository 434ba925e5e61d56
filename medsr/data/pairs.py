"""Pair storage: LR/HR image pairs of varied sizes, memory-mapped for fast random patches.

A pair set is one folder (``data/pairs/<split>/x<scale>/<kind>``) holding

* ``hr.npy`` and ``lr.npy``: every image of the set, flattened and concatenated (float32),
  so that ``np.load(mmap_mode="r")`` gives random access without reading the whole file;
* ``index.json``: per pair its id, modality, offsets and shapes, plus the set's attributes.

One flat array per side, rather than one file per image, keeps a DataLoader worker's random
patch read to a single memory-mapped slice; npz/zarr would need decompression per read.

A tile set (``data/pairs/train/hr``) is the same format with the HR side only: the training
tiles, which :class:`medsr.training.data.PatchBatches` degrades patch by patch as it draws them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
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
    hr: np.ndarray  # (1, H, W) float32; None on its way from a pool worker (pairing._make_pair_without_hr)
    #                 and where write_pairs shares an earlier set's HR (hr_like)
    lr: np.ndarray  # (1, H/scale, W/scale) float32
    degradation: dict[str, float] | None = None  # the blur/noise this pair's LR was made with, when drawn


def _npy_header(length: int) -> bytes:
    """The header ``np.save`` writes for a flat float32 array of ``length`` values."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                   "fortran_order": False, "shape": (int(length),)})
    return buffer.getvalue()


class _FlatArrayFile:
    """A flat float32 ``.npy`` written one image at a time: the same bytes as ``np.save`` of their
    concatenation, without holding the set in memory or copying it once more. The header is written
    again at the end with the final length; numpy pads it for growth, so its size does not change."""

    def __init__(self, path: Path) -> None:
        self.length = 0
        self._file = path.open("wb")
        self._header_size = self._file.write(_npy_header(0))

    def append(self, pixels: np.ndarray) -> int:
        """Write ``pixels`` (float32, any layout: written in C order); returns its offset."""
        offset = self.length
        pixels.tofile(self._file)
        self.length += pixels.size
        return offset

    def close(self) -> None:
        header = _npy_header(self.length)
        if len(header) != self._header_size:  # numpy's growth padding makes this unreachable in practice
            raise RuntimeError(f"{self._file.name}: npy header grew from {self._header_size} to {len(header)} bytes")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links (some network shares)
        shutil.copyfile(source, target)


def write_pairs(folder: str | Path, items: Iterable[PairItem], scale: int, attrs: dict[str, Any] | None = None, *,
                hr_like: str | Path | None = None) -> int:
    """Write a pair set atomically; returns the number of pairs written.

    Pairs are written as they arrive, so a parallel producer's next pairs are computed while this
    one's are on their way to disk, and memory holds one pair rather than the set.

    ``hr_like``: a pair set written before with the same HR images in the same order (another kind
    of the same split and scale). Its ``hr.npy`` is hard-linked (copied where links are not
    supported) instead of written again, the items' ``hr`` is not read (it may be None), and each
    item must have that set's id and an LR that fits its HR.
    """
    shared = PairSet(hr_like).pairs if hr_like is not None else None
    index: list[dict[str, Any]] = []
    with atomic_dir(folder) as tmp:
        hr_file = _FlatArrayFile(tmp / "hr.npy") if shared is None else None
        lr_file = _FlatArrayFile(tmp / "lr.npy")
        try:
            for item in items:
                check_contract(item.lr, f"{item.id} (LR)")
                lh, lw = item.lr.shape[-2:]
                if shared is None:
                    check_contract(item.hr, f"{item.id} (HR)")
                    h, w = item.hr.shape[-2:]
                    hr_offset = hr_file.append(item.hr)
                else:
                    if len(index) >= len(shared) or shared[len(index)]["id"] != item.id:
                        raise ValueError(f"{item.id}: not pair {len(index)} of {hr_like}, whose HR images it should share")
                    h, w = shared[len(index)]["hr_shape"]
                    hr_offset = shared[len(index)]["hr_offset"]
                if (lh * scale, lw * scale) != (h, w):
                    raise ValueError(f"{item.id}: LR {lh}x{lw} times scale {scale} is not HR {h}x{w}")
                entry = {"id": item.id, "modality": item.modality, "hr_offset": hr_offset,
                         "hr_shape": [h, w], "lr_offset": lr_file.append(item.lr), "lr_shape": [lh, lw]}
                if item.degradation is not None:
                    entry["degradation"] = {k: round(float(v), 6) for k, v in item.degradation.items()}
                index.append(entry)
        finally:
            if hr_file is not None:
                hr_file.close()
            lr_file.close()
        if shared is not None:
            if len(index) != len(shared):
                raise ValueError(f"{folder}: {len(index)} pairs, but {hr_like} has {len(shared)} HR images to share")
            _link_or_copy(Path(hr_like) / "hr.npy", tmp / "hr.npy")
        meta = {"scale": scale, "count": len(index), "attrs": attrs or {}, "pairs": index}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return len(index)


def write_tiles(folder: str | Path, items: Iterable[tuple[str, str, np.ndarray]],
                attrs: dict[str, Any] | None = None) -> int:
    """Write a tile set (HR only) atomically from ``(id, modality, pixels)``; returns the count."""
    index: list[dict[str, Any]] = []
    with atomic_dir(folder) as tmp:
        hr_file = _FlatArrayFile(tmp / "hr.npy")
        try:
            for tile_id, modality, pixels in items:
                check_contract(pixels, f"{tile_id} (HR)")
                h, w = pixels.shape[-2:]
                index.append({"id": tile_id, "modality": modality, "hr_offset": hr_file.append(pixels), "hr_shape": [h, w]})
        finally:
            hr_file.close()
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
        self._hr: np.ndarray | None = None
        self._lr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hr"] = state["_lr"] = None  # each worker maps the files itself
        return state

    def _hr_map(self) -> np.ndarray:
        if self._hr is None:
            self._hr = np.load(self.folder / "hr.npy", mmap_mode="r")
        return self._hr

    def modalities(self) -> list[str]:
        return sorted({p["modality"] for p in self.pairs})

    def hr_view(self, i: int) -> np.ndarray:
        """Image ``i`` as a read-only memory-mapped ``(1, H, W)`` view: slicing it reads only that part."""
        p = self.pairs[i]
        h, w = p["hr_shape"]
        return self._hr_map()[p["hr_offset"]:p["hr_offset"] + h * w].reshape(1, h, w)

    def hr(self, i: int) -> np.ndarray:
        return np.asarray(self.hr_view(i))


class PairSet(TileSet):
    """Read-only view of a pair set: a tile set with an LR image per HR image."""

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        if self._lr is None:
            self._lr = np.load(self.folder / "lr.npy", mmap_mode="r")
        return self._hr_map(), self._lr

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
