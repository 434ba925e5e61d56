"""Degrading in parallel (local processes or a Dask cluster) writes exactly the bytes one process writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsr.data.pairing import build_pair_sets
from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, dict]:
    """Stored tiles as ingest stores them: 8-bit-exact images in a uint8 shard, the rest in uint16."""
    from medsr.data.shards import ShardWriter, encode

    root = tmp_path_factory.mktemp("interim")
    (root / "shards").mkdir()
    shards = ShardWriter(root / "shards", prefix="shards/")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        modality = ("xray", "ct", "mri")[i % 3]
        pixels = rng.random((1, 48 + 8 * (i % 2), 64), dtype=np.float32)
        if i % 2:
            pixels = (np.rint(pixels * 255) / 255).astype(np.float32)
        stored = encode(pixels)
        array, offset = shards.append(stored)
        rows.append({"id": f"{modality}-{i:03d}", "modality": modality, "array": array, "offset": offset,
                     "height": pixels.shape[1], "width": pixels.shape[2], "stored_dtype": stored.dtype.name,
                     "split": ("train", "val", "test")[i % 3]})
    shards.close()
    params = load_params(REPO_ROOT / "params.yaml")["degrade"]
    return root, pd.DataFrame(rows), params


def test_one_and_two_workers_write_identical_pairs(images, tmp_path: Path) -> None:
    interim, table, params = images
    one = build_pair_sets(table, interim, tmp_path / "one", params, workers=1)
    two = build_pair_sets(table, interim, tmp_path / "two", params, workers=2)
    assert one == two
    digests = _digests(tmp_path / "one")
    # train/hr (index and two linked shards), 2 splits x 2 scales x 2 tracks (index, lr, two linked shards)
    assert len(digests) == 3 + 8 * 4 and digests == _digests(tmp_path / "two")


def test_a_local_dask_cluster_writes_identical_pairs(images, tmp_path: Path) -> None:
    from distributed import LocalCluster

    interim, table, params = images
    build_pair_sets(table, interim, tmp_path / "one", params, workers=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        build_pair_sets(table, interim, tmp_path / "dask", params, dask_address=cluster.scheduler_address)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "dask")


def test_bad_worker_count_is_refused(images, tmp_path: Path) -> None:
    interim, table, params = images
    with pytest.raises(ValueError, match="degrade.workers"):
        build_pair_sets(table, interim, tmp_path / "x", params, workers=0)


def test_every_set_stores_the_hr_its_lr_was_made_from_as_links_to_the_stored_tiles(images, tmp_path: Path) -> None:
    from medsr.data.pairing import PairSource, make_pair
    from medsr.data.pairs import PairSet, TileSet
    from medsr.data.shards import read_tile

    interim, table, params = images
    build_pair_sets(table, interim, tmp_path / "pairs", params, workers=2)
    sources = {r.id: PairSource.of_row(interim, r) for r in table.itertuples()}
    stored = {p.name: p.stat().st_ino for p in (interim / "shards").iterdir()}

    def shares_the_stored_bytes(folder: Path) -> None:
        shards = {p.name: p.stat().st_ino for p in folder.glob("*.npy") if p.name != "lr.npy"}
        assert shards and shards == {name: stored[name] for name in shards}  # links: no HR byte written twice

    for split in ("val", "test"):
        for scale in params["scales"]:
            sets = {p.name: p for p in (tmp_path / "pairs" / split / f"x{scale}").iterdir()}
            assert set(sets) == {"clean", "realistic"}  # the tracks; nothing reads other kinds there
            for kind, folder in sets.items():
                pairs = PairSet(folder)
                # the HR a reader gets is the one make_pair degraded into that LR, in every track
                for i, pair in enumerate(pairs.pairs):
                    made = make_pair(sources[pair["id"]], scale=scale, kind=kind, params=params)
                    np.testing.assert_array_equal(pairs.hr(i), made.hr)
                    np.testing.assert_array_equal(pairs.lr(i), made.lr)
                shares_the_stored_bytes(folder)
    # train: the stored tiles alone, whatever the scales; its pairs are degraded as they are drawn
    assert [p.name for p in (tmp_path / "pairs" / "train").iterdir()] == ["hr"]
    tiles = TileSet(tmp_path / "pairs" / "train" / "hr")
    train = table[table["split"] == "train"].sort_values("id")
    assert [p["id"] for p in tiles.pairs] == list(train["id"])
    for i, row in enumerate(train.itertuples()):
        np.testing.assert_array_equal(tiles.hr(i), read_tile(interim, row))
        np.testing.assert_array_equal(np.asarray(tiles.hr_view(i))[:, 3:9, 5:20], tiles.hr_view(i)[:, 3:9, 5:20])
    shares_the_stored_bytes(tmp_path / "pairs" / "train" / "hr")


def test_streamed_sets_hold_the_bytes_np_save_writes(tmp_path: Path) -> None:
    from medsr.data.pairs import PairItem, write_pairs

    rng = np.random.default_rng(3)
    items = [PairItem(f"ct-{i}", "ct", hr=rng.random((1, 8 * (i + 1), 12), dtype=np.float32),
                      lr=rng.random((1, 4 * (i + 1), 6), dtype=np.float32)) for i in range(3)]
    write_pairs(tmp_path / "set", iter(items), 2)
    for side in ("hr", "lr"):
        expected = tmp_path / f"{side}-expected.npy"
        np.save(expected, np.concatenate([getattr(i, side).ravel() for i in items]))
        assert (tmp_path / "set" / f"{side}.npy").read_bytes() == expected.read_bytes()


def test_a_set_whose_hr_comes_from_stored_tiles_needs_one_tile_per_pair(tmp_path: Path) -> None:
    from medsr.data.pairs import PairItem, write_pairs
    from medsr.data.shards import ShardWriter, TileRef

    shards = ShardWriter(tmp_path)
    _, offset = shards.append(np.zeros((1, 8, 8), np.uint8))
    shards.close()
    tile = TileRef(tmp_path / "u8-00000.npy", offset, 8, 8)
    lr = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="more pairs than the 1 stored tiles"):
        write_pairs(tmp_path / "second", [PairItem("a", "ct", None, lr), PairItem("c", "ct", None, lr)], 2,
                    hr_tiles=[tile])
    with pytest.raises(ValueError, match="1 pairs for 2 stored tiles"):
        write_pairs(tmp_path / "third", [PairItem("a", "ct", None, lr)], 2, hr_tiles=[tile, tile])
    assert not (tmp_path / "second").exists() and not (tmp_path / "third").exists()


def test_one_worker_degrades_on_one_torch_thread_and_gives_the_threads_back() -> None:
    import torch

    from medsr.data.pairing import parallel_mapper

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with parallel_mapper(1) as mapper:
            assert mapper is map and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
