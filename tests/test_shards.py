"""Stored tiles: the source's own sample type on disk, the float32 contract when read, few files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsr.data.ingest import TABLE_NAME, IngestOptions, ingest
from medsr.data.loading import load_image
from medsr.data.shards import ShardWriter, TileRef, decode, encode, read_tile
from medsr.data.tiling import tile_image

HALF_STEP = 0.5 / 65535 + 1e-7  # rint's error, plus float32 rounding of the decoded value


def _loaded_tiles(path: Path, modality: str, tile: int = 64) -> list[np.ndarray]:
    """The float32 tiles the loader and tiler give, in ingest's order: what was stored before."""
    return [t.pixels for image in load_image(path, modality, root=path.parent) for _, _, t in tile_image(image, tile)]


def _ingested(raw: Path, tmp_path: Path, **kwargs) -> tuple[Path, pd.DataFrame]:
    out = tmp_path / "interim"
    table = ingest(raw, out, IngestOptions(tile_size=64), None, **kwargs)
    return out, table


def test_an_8bit_source_is_stored_as_uint8_and_reads_back_exactly(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "xray"
    raw.mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((130, 200)) * 255).astype(np.uint8)).save(raw / "a.png")
    interim, table = _ingested(tmp_path / "raw", tmp_path)
    assert set(table["stored_dtype"]) == {"uint8"} and table["array"].unique().tolist() == ["shards/u8-00000.npy"]
    expected = _loaded_tiles(raw / "a.png", "xray")
    assert len(expected) == len(table) == 2 * 3
    for row, before in zip(table.itertuples(), expected, strict=True):
        pixels = read_tile(interim, row)
        assert pixels.dtype == np.float32 and pixels.tobytes() == before.tobytes()
    # one byte a pixel on disk (plus the .npy header)
    assert (interim / "shards" / "u8-00000.npy").stat().st_size - 128 == int((table["height"] * table["width"]).sum())


def test_a_16bit_source_is_exact_and_a_windowed_one_within_half_a_16bit_step(tmp_path: Path, sample_raw: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "xray").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(1).random((70, 140)) * 65535).astype(np.uint16)).save(raw / "xray" / "b.png")
    (raw / "ct").mkdir()
    shutil.copy(sample_raw / "ct" / "CT_small.dcm", raw / "ct" / "c.dcm")  # a DICOM window: quantised
    interim, table = _ingested(raw, tmp_path)
    assert set(table["stored_dtype"]) == {"uint16"}
    xray = table[table["modality"] == "xray"]
    for row, before in zip(xray.itertuples(), _loaded_tiles(raw / "xray" / "b.png", "xray"), strict=True):
        assert read_tile(interim, row).tobytes() == before.tobytes()
    ct = table[table["modality"] == "ct"]
    expected = _loaded_tiles(raw / "ct" / "c.dcm", "ct")
    assert len(expected) == len(ct) > 0
    worst = max(float(np.abs(read_tile(interim, row) - before).max())
                for row, before in zip(ct.itertuples(), expected, strict=True))
    assert 0 < worst <= HALF_STEP  # windowed: not exact, but within half a 16-bit step


def test_encode_picks_the_smallest_exact_type_and_bounds_the_rest() -> None:
    rng = np.random.default_rng(2)
    eight = (rng.integers(0, 256, (1, 9, 11)) / 255).astype(np.float32)
    assert encode(eight).dtype == np.uint8 and decode(encode(eight)).tobytes() == eight.tobytes()
    sixteen = (rng.integers(0, 65536, (1, 9, 11)) / 65535).astype(np.float32)
    assert encode(sixteen).dtype == np.uint16 and decode(encode(sixteen)).tobytes() == sixteen.tobytes()
    floats = rng.random((1, 64, 64), dtype=np.float32)
    back = decode(encode(floats))
    assert encode(floats).dtype == np.uint16 and back.dtype == np.float32
    assert float(np.abs(back - floats).max()) <= HALF_STEP


def test_tiles_fill_shards_in_order_and_are_read_by_offset(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 256, (1, 20, 30 + i), dtype=np.uint8) for i in range(7)]
    writer = ShardWriter(tmp_path, shard_bytes=2000)  # tiles of 600 to 720 bytes: 3, 2 and 2 a shard
    refs = [TileRef(tmp_path / name, offset, 20, 30 + i) for i, (name, offset) in enumerate(map(writer.append, tiles))]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"u8-{n:05d}.npy" for n in range(3)]
    assert [(r.file.name[3:8], r.offset) for r in refs] == [("00000", 0), ("00000", 600), ("00000", 1220),
                                                             ("00001", 0), ("00001", 660), ("00002", 0), ("00002", 700)]
    for ref, tile in zip(refs, tiles, strict=True):
        row = {"array": ref.file.name, "offset": ref.offset, "height": ref.height, "width": ref.width}
        np.testing.assert_array_equal(read_tile(tmp_path, row), decode(tile))
    with pytest.raises(ValueError, match="runs past"):
        read_tile(tmp_path, {"array": "u8-00000.npy", "offset": refs[2].offset + 1, "height": 20, "width": 32})


def test_the_same_files_give_the_same_shards(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "xray"
    raw.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((128, 128)) * 255).astype(np.uint8)).save(raw / f"{i}.png")
    one = ingest(tmp_path / "raw", tmp_path / "one", IngestOptions(tile_size=64), None, shard_bytes=10_000)
    two = ingest(tmp_path / "raw", tmp_path / "two", IngestOptions(tile_size=64), None, shard_bytes=10_000)
    pd.testing.assert_frame_equal(one, two)
    names = sorted(p.name for p in (tmp_path / "one" / "shards").iterdir())
    assert len(names) == 6  # 12 tiles of 4 kB, two a shard
    for name in names:
        assert (tmp_path / "one" / "shards" / name).read_bytes() == (tmp_path / "two" / "shards" / name).read_bytes()
    assert (tmp_path / "one" / TABLE_NAME).read_bytes() == (tmp_path / "two" / TABLE_NAME).read_bytes()


def test_reading_every_tile_once_keeps_memory_flat(tmp_path: Path) -> None:
    """Validate and degrade read each tile once: their memory must not grow with the shards they read
    (mapping them kept every page touched resident: 1.1 GB at 800 NIH-size images)."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read the peak RSS")
    tile = np.random.default_rng(4).integers(0, 256, (1, 256, 256), dtype=np.uint8)
    writer = ShardWriter(tmp_path, shard_bytes=32 << 20)
    refs = [writer.append(tile) for _ in range(1024)]  # 64 MB in two shards
    writer.close()
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
    script = f"""
from pathlib import Path
from medsr.data.shards import read_tile

def peak_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) // 1024

before = peak_mb()
for name, offset in {refs!r}:
    read_tile({str(tmp_path)!r}, {{"array": name, "offset": offset, "height": 256, "width": 256}})
print(peak_mb() - before)
"""
    grown_mb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 16, f"RSS grew {grown_mb} MB reading 64 MB of tiles once"


def test_the_digest_is_of_the_stored_tile_and_equal_pixels_give_equal_digests() -> None:
    from medsr.data.shards import decode, encode, tile_digest

    rng = np.random.default_rng(5)
    eight_bit = (rng.integers(0, 256, (1, 32, 32)) / 255.0).astype(np.float32)
    windowed = rng.random((1, 32, 32)).astype(np.float32)
    for pixels in (eight_bit, windowed):
        stored = encode(pixels)
        assert tile_digest(stored) == tile_digest(encode(decode(stored).copy()))  # the same tile again
        changed = stored.copy()
        changed[0, 3, 4] ^= 1
        assert tile_digest(changed) != tile_digest(stored)
    assert encode(eight_bit).dtype == np.uint8 and encode(windowed).dtype == np.uint16
    # Two tiles whose samples share bytes but not a dtype are different tiles.
    assert tile_digest(np.zeros((1, 2, 2), np.uint16)) != tile_digest(np.zeros((1, 2, 4), np.uint8))
