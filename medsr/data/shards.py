"""Stored tiles: pixels in the source's own sample type, packed into a few memory-mapped shard files.

The array contract in memory is float32 in [0, 1] (:mod:`medsr.data`); on disk a tile costs what
its source's samples cost:

* ``uint8`` when the tile is exactly ``q / 255`` for 8-bit ``q`` (an 8-bit PNG or JPEG through its
  dtype-range window): decoding gives back the very float32 values the loader made;
* ``uint16`` otherwise: exact for 16-bit sources through their dtype-range window (``q / 65535``),
  and for windowed DICOM/NIfTI, percentile-windowed and float sources a quantisation to 16 bits,
  ``q = rint(x * 65535)``, whose error is at most 0.5/65535 (+ float32 rounding), within 1/65535:
  far below any noise level a degradation adds (0.01) and below a 16-bit display's step;
* ``float32`` (only for arrays handed in as float32 files, e.g. tests and pair sets written from
  arrays): as is.

Decoding is ``float32(q / max(dtype))`` (a lookup table per dtype), so the dtype is all a reader
needs to convert back; the table and the index record it with every tile.

A shard (``<kind>-<number>.npy``) is one flat ``.npy`` array of one dtype holding many tiles back
to back, at most :data:`SHARD_BYTES`; a tile is ``(shard file, offset in samples, height, width)``.
At NIH's size (112,120 images, 16 tiles each) that is a few hundred files for DVC to track instead
of 1.79 million, and ``np.load(mmap_mode="r")`` reads only the slice a caller touches.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SHARD_BYTES = 256 * 1024 * 1024  # a few hundred MB: few files, each still quick to hash and copy
SHARD_KINDS: dict[str, str] = {"uint8": "u8", "uint16": "u16", "float32": "f32"}
STORED_MAX: dict[str, int] = {"uint8": 255, "uint16": 65535}


@lru_cache(maxsize=None)
def _lookup(dtype_name: str) -> np.ndarray:
    """float32 of every stored value: the exact values the loader's float64 window gives, cast."""
    top = STORED_MAX[dtype_name]
    return (np.arange(top + 1, dtype=np.float64) / top).astype(np.float32)


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored samples (any shape) -> float32 contract values."""
    name = stored.dtype.name
    if name in STORED_MAX:
        return _lookup(name)[stored]
    if name == "float32":
        return np.array(stored, dtype=np.float32)
    raise TypeError(f"stored tiles are uint8, uint16 or float32, not {name}")


def encode(pixels: np.ndarray) -> np.ndarray:
    """Contract pixels -> the smallest stored type that holds them (module docstring): uint8 when
    that round-trips exactly, else uint16 (exact for 16-bit sources, else within 1/65535)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    clipped = np.clip(np.nan_to_num(pixels), 0.0, 1.0)  # a broken tile still encodes; its table row shows it
    q8 = np.rint(clipped * 255.0).astype(np.uint8)
    if np.array_equal(decode(q8), pixels):
        return q8
    # Exact for 16-bit sources; a quantisation for windowed and float ones: |decode(q) - x| is at
    # most 0.5/65535 plus float32 rounding, within 1/65535 (tests/test_shards.py holds it to that).
    return np.rint(clipped.astype(np.float64) * 65535.0).astype(np.uint16)


@dataclass(frozen=True)
class TileRef:
    """Where one stored tile lies: ``file`` (a shard), ``offset`` in samples, its stored ``shape``."""

    file: Path
    offset: int
    height: int
    width: int

    @classmethod
    def of_row(cls, root: Path, row: Any) -> TileRef:
        """The tile of a table row (``array``, ``offset``, ``height``, ``width``) under ``root``.

        A row without an offset names a whole ``.npy`` file of its own (one tile, any dtype above).
        """
        # A dict or a pandas row (both have .get), or an itertuples row.
        get = row.get if hasattr(row, "get") else lambda key, default=None: getattr(row, key, default)
        file = Path(root) / str(get("array"))
        try:
            offset = int(get("offset", None))
        except (TypeError, ValueError):  # missing, None, NaN or <NA>: a file of its own, (1, H, W) or (H, W)
            shape = np.load(file, mmap_mode="r", allow_pickle=False).shape
            return cls(file, 0, int(shape[-2]), int(shape[-1]))
        return cls(file, offset, int(get("height")), int(get("width")))


class ShardReader:
    """Memory maps of shard files, opened on first use; cheap to pickle (maps are reopened)."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"_maps": {}}

    def stored(self, ref: TileRef) -> np.ndarray:
        """The tile's stored samples as a read-only ``(1, H, W)`` memory-mapped view."""
        data = self._maps.get(ref.file)
        if data is None:
            data = self._maps[ref.file] = np.load(ref.file, mmap_mode="r", allow_pickle=False)
        data = data.reshape(-1)  # a view: shards are flat, and a tile's own file is C-ordered
        n = ref.height * ref.width
        if ref.offset + n > data.size:
            raise ValueError(f"{ref.file}: tile at {ref.offset} of {n} samples runs past the shard's {data.size}")
        return data[ref.offset:ref.offset + n].reshape(1, ref.height, ref.width)


@lru_cache(maxsize=4096)
def _layout(file: Path, identity: tuple[int, int, int]) -> tuple[np.dtype, int, int]:
    """(dtype, where the samples start, how many) of a ``.npy`` file; ``identity`` (inode, size,
    mtime) keys the cache, so a file replaced under the same name is read anew."""
    with file.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        if fortran and len(shape) > 1:
            raise ValueError(f"{file}: a Fortran-ordered array; tiles are stored in C order")
        return dtype, handle.tell(), int(np.prod(shape))


def read_ref(ref: TileRef) -> np.ndarray:
    """The contract pixels (float32 ``(1, H, W)``) of a stored tile (:func:`read_samples`, decoded)."""
    return decode(read_samples(ref))


def read_samples(ref: TileRef) -> np.ndarray:
    """A stored tile's samples as stored (``(1, H, W)`` of the shard's dtype).

    Read with one positioned read, not through a memory map: a stage that reads every tile once
    (validate, degrade) would otherwise keep every shard page it touched mapped, so its RSS would
    grow with the data set (1.1 GB at 800 NIH-size images)."""
    info = ref.file.stat()
    dtype, start, count = _layout(ref.file, (info.st_ino, info.st_size, info.st_mtime_ns))
    n = ref.height * ref.width
    if ref.offset < 0 or ref.offset + n > count:
        raise ValueError(f"{ref.file}: tile at {ref.offset} of {n} samples runs past the shard's {count}")
    stored = np.fromfile(ref.file, dtype=dtype, count=n, offset=start + ref.offset * dtype.itemsize)
    return stored.reshape(1, ref.height, ref.width)


def read_tile(root: str | Path, row: Any) -> np.ndarray:
    """The contract pixels (float32 ``(1, H, W)``) of a table row's stored tile: the one way every
    stage reads ``data/interim``."""
    return read_ref(TileRef.of_row(Path(root), row))


def read_stored(root: str | Path, row: Any) -> np.ndarray:
    """A table row's tile as stored (``(1, H, W)`` of its ``stored_dtype``), undecoded."""
    return read_samples(TileRef.of_row(Path(root), row))


def tile_digest(stored: np.ndarray) -> str:
    """sha256 of a stored tile (its dtype and samples): the table's ``sha256``. :func:`encode` picks
    dtype and samples from the pixel values alone, so equal tiles have equal digests, as a digest of
    the decoded float32 would; hashing the stored bytes reads a quarter of them for uint8 tiles."""
    digest = hashlib.sha256(stored.dtype.name.encode())
    digest.update(np.ascontiguousarray(stored).tobytes())
    return digest.hexdigest()


class StoredTile:
    """A stored tile (or its top-left crop) that decodes only what is sliced from it: a training
    patch reads its crop, not the tile. ``np.asarray`` of it decodes the whole."""

    def __init__(self, stored: np.ndarray) -> None:
        self.stored = stored
        self.shape: tuple[int, ...] = stored.shape

    def __getitem__(self, key: Any) -> np.ndarray:
        return decode(self.stored[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        pixels = decode(self.stored)
        return pixels if dtype is None else pixels.astype(dtype)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The header ``np.save`` writes for a flat array of ``length`` values of ``dtype``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (int(length),)})
    return buffer.getvalue()


class FlatArrayFile:
    """A flat ``.npy`` written one array at a time: the same bytes as ``np.save`` of their
    concatenation, without holding them in memory. The header is written again at the end with the
    final length; numpy pads it for growth, so its size does not change."""

    def __init__(self, path: Path, dtype: str | np.dtype = np.float32) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file = self.path.open("wb")
        self._header_size = self._file.write(_npy_header(self.dtype, 0))

    def append(self, values: np.ndarray) -> int:
        """Write ``values`` (of this file's dtype, any layout: written in C order); returns its offset."""
        if values.dtype != self.dtype:
            raise TypeError(f"{self.path.name} holds {self.dtype}, not {values.dtype}")
        offset = self.length
        np.ascontiguousarray(values).tofile(self._file)
        self.length += values.size
        return offset

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        header = _npy_header(self.dtype, self.length)
        if len(header) != self._header_size:  # numpy's growth padding makes this unreachable in practice
            raise RuntimeError(f"{self._file.name}: npy header grew from {self._header_size} to {len(header)} bytes")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()


class ShardWriter:
    """Stored tiles appended to ``folder/<kind>-<number>.npy``, one open shard per dtype, a new one
    when the next tile would pass ``shard_bytes``. Tiles arrive in a fixed order, so the same tiles
    give the same shards, byte for byte."""

    def __init__(self, folder: Path, prefix: str = "", shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.shard_bytes = int(shard_bytes)
        self._open: dict[str, FlatArrayFile] = {}
        self._count: dict[str, int] = {}

    def append(self, stored: np.ndarray) -> tuple[str, int]:
        """Write one tile; returns ``(prefix + shard file name, offset in samples)``."""
        name = stored.dtype.name
        if name not in SHARD_KINDS:
            raise TypeError(f"stored tiles are uint8, uint16 or float32, not {name}")
        shard = self._open.get(name)
        if shard is not None and shard.length and (shard.length + stored.size) * shard.dtype.itemsize > self.shard_bytes:
            shard.close()
            shard = None
        if shard is None:
            number = self._count.get(name, 0)
            self._count[name] = number + 1
            shard = self._open[name] = FlatArrayFile(self.folder / f"{SHARD_KINDS[name]}-{number:05d}.npy", name)
        return self.prefix + shard.path.name, shard.append(stored)

    def close(self) -> None:
        for shard in self._open.values():  # the shards filled earlier were closed as they filled
            if not shard.closed:
                shard.close()
