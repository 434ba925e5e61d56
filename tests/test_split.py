"""The split never puts one patient, one file or neighbouring regions in two splits, and is deterministic."""

from __future__ import annotations

import pandas as pd
import pytest

from medsr.data.split import GAP, find_leaks, leaked_patients, split_table

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _table(n_patients: int, images_each: int, modality: str = "xray") -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for k in range(images_each):
            rows.append({"id": f"{modality}-{p:03d}-{k}", "patient_key": f"pk{p:03d}", "modality": modality,
                         "path": f"{modality}/p{p}.dcm", "frame": k, "tile_y": 0, "tile_x": 0})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits() -> None:
    table = _table(40, 5)
    out = split_table(table, FRACTIONS, seed=7)
    assert (out["split_method"] == "patient").all()
    assert out.groupby("patient_key")["split"].nunique().max() == 1
    assert leaked_patients(out) == []
    counts = out.drop_duplicates("patient_key")["split"].value_counts()
    assert counts["train"] == 28 and counts["val"] == 6 and counts["test"] == 6


def test_deterministic_and_seed_dependent() -> None:
    table = _table(30, 2)
    a = split_table(table, FRACTIONS, seed=1)
    b = split_table(table.sample(frac=1.0, random_state=3), FRACTIONS, seed=1)
    pd.testing.assert_frame_equal(a, b)
    c = split_table(table, FRACTIONS, seed=2)
    assert not a["split"].equals(c["split"])


def test_leak_detector_catches_a_leak() -> None:
    out = split_table(_table(10, 3), FRACTIONS, seed=1)
    out.loc[out.index[0], "split"] = "test" if out.loc[out.index[0], "split"] != "test" else "train"
    assert leaked_patients(out) == [out.loc[out.index[0], "patient_key"]]


def _radiograph(rows: int = 7, cols: int = 7) -> pd.DataFrame:
    # One radiograph cut into a grid of tiles: one file, one patient, so region split.
    return pd.DataFrame([{"id": f"x-{y}-{x}", "patient_key": "pk", "modality": "xray", "path": "xray/RG1.dcm",
                          "frame": None, "tile_y": y * 256, "tile_x": x * 256} for y in range(rows) for x in range(cols)])


def _grid(out: pd.DataFrame) -> list[str]:
    rows = int(out["tile_y"].max()) // 256 + 1
    cols = int(out["tile_x"].max()) // 256 + 1
    grid = [["?"] * cols for _ in range(rows)]
    for row in out.itertuples():
        grid[row.tile_y // 256][row.tile_x // 256] = row.split[0]
    return ["".join(line) for line in grid]


def test_one_file_is_split_by_region_with_a_gap_around_every_block() -> None:
    out = split_table(_radiograph(), FRACTIONS, seed=1)
    assert set(out["split_method"]) == {"region"}
    assert _grid(out) == ["ttttttt"] * 4 + ["ggggggg", "vvvgttt", "vvvgttt"]
    assert find_leaks(out) == []


def _neighbours(out: pd.DataFrame) -> set[tuple[str, str]]:
    cells = {(row.tile_y // 256, row.tile_x // 256): row.split for row in out.itertuples()}
    pairs = set()
    for (y, x), split in cells.items():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                other = cells.get((y + dy, x + dx))
                if other is not None and other != split and GAP not in (split, other):
                    pairs.add(tuple(sorted((split, other))))
    return pairs


@pytest.mark.parametrize("shape", [(7, 7), (3, 3), (9, 4), (1, 9), (8, 1), (5, 2)])
def test_region_blocks_never_touch(shape: tuple[int, int]) -> None:
    out = split_table(_radiograph(*shape), FRACTIONS, seed=3)
    assert _neighbours(out) == set()  # independent of find_leaks: counts 8-neighbours directly
    assert find_leaks(out) == []
    assert {"train", "val", "test"} <= set(out["split"])


def test_slices_of_one_volume_split_with_gap_slices() -> None:
    rows = [{"id": f"m-{k:02d}", "patient_key": "pk", "modality": "mri", "path": "mri/brain.nii.gz",
             "frame": 30 + 6 * k, "tile_y": 0, "tile_x": 0} for k in range(19)]
    out = split_table(pd.DataFrame(rows), FRACTIONS, seed=1).sort_values("frame")
    labels = out["split"].tolist()
    assert labels == ["train"] * 12 + [GAP] + ["val"] * 3 + [GAP] + ["test"] * 2
    assert find_leaks(out) == []


def _files_table(sizes: dict[str, int], modality: str = "mri") -> pd.DataFrame:
    return pd.DataFrame([{"id": f"{name}-{k}", "patient_key": f"pk-{name}", "modality": modality,
                          "path": f"{modality}/{name}.dcm", "frame": k, "tile_y": 0, "tile_x": 0}
                         for name, n in sizes.items() for k in range(n)])


def test_few_patients_many_files_split_whole_files() -> None:
    out = split_table(_files_table({"volume": 19, "tiles": 16, "frames": 10}), FRACTIONS, seed=1234, min_patients=10)
    assert set(out["split_method"]) == {"file"}
    assert out.groupby("path")["split"].nunique().max() == 1  # no file in two splits
    assert out.loc[out["path"] == "mri/volume.dcm", "split"].iloc[0] == "train"  # the bulk trains
    assert set(out["split"]) == {"train", "val", "test"}
    assert find_leaks(out) == []


def test_two_files_test_is_a_whole_file() -> None:
    out = split_table(_files_table({"series": 8, "small": 1}, "ct"), FRACTIONS, seed=1234, min_patients=10)
    assert out.loc[out["path"] == "ct/small.dcm", "split"].tolist() == ["test"]
    assert set(out.loc[out["path"] == "ct/series.dcm", "split"]) <= {"train", "val", GAP}
    assert find_leaks(out) == []


def test_many_patients_synthetic_table_never_leaks() -> None:
    table = pd.concat([_table(60, 4, "xray"), _table(25, 3, "ct")], ignore_index=True)
    out = split_table(table, FRACTIONS, seed=11)
    assert set(out["split_method"]) == {"patient"}
    assert out.groupby("path")["split"].nunique().max() == 1
    assert out.groupby("patient_key")["split"].nunique().max() == 1
    assert find_leaks(out) == []


def test_leak_check_fails_on_a_planted_leak_of_each_kind() -> None:
    by_patient = split_table(_table(20, 2), FRACTIONS, seed=1)
    moved = by_patient.copy()
    first = moved.index[0]
    moved.loc[first, "split"] = "test" if moved.loc[first, "split"] != "test" else "train"
    assert any("patient" in leak for leak in find_leaks(moved))

    by_file = split_table(_files_table({"a": 5, "b": 4, "c": 3}), FRACTIONS, seed=1, min_patients=10)
    test_file = by_file.loc[by_file["split"] == "test", "path"].iloc[0]
    by_file.loc[by_file.index[by_file["path"] == test_file][0], "split"] = "train"
    assert any(test_file in leak for leak in find_leaks(by_file))

    by_region = split_table(_radiograph(), FRACTIONS, seed=1)
    gap_cell = by_region.index[(by_region["tile_y"] == 4 * 256) & (by_region["tile_x"] == 0)][0]
    by_region.loc[gap_cell, "split"] = "train"  # a training tile now touches the val block
    assert any("touches" in leak for leak in find_leaks(by_region))


def test_split_stage_refuses_a_leaking_split(tmp_path, monkeypatch) -> None:
    import medsr.data.split as split_module
    from medsr import pipeline

    table = _radiograph()
    (tmp_path / "data" / "validated").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    table.to_parquet("data/validated/images.parquet", index=False)
    real = split_module.split_table

    def without_gap(*args, **kwargs):  # the bug the check exists for: neighbours in two splits
        out = real(*args, **kwargs)
        return out.assign(split=out["split"].replace(GAP, "train"))

    monkeypatch.setattr(split_module, "split_table", without_gap)
    params = {"data": {"split": {"fractions": FRACTIONS, "seed": 1, "min_patients": 10}}}
    with pytest.raises(pipeline.StageFailed, match="leaked"):
        pipeline.split_stage(params)
    assert not (tmp_path / "data" / "split").exists()


@pytest.mark.parametrize("bad", [{"train": -1, "val": 1, "test": 1}, {"train": 0, "val": 0, "test": 0}])
def test_bad_fractions_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_table(_table(10, 1), bad, seed=1)


def test_split_stage_fails_when_a_modality_has_no_val_or_test_image(tmp_path, monkeypatch) -> None:
    """A modality reduced to one image (e.g. by a quarantine) cannot be validated or tested: the
    stage says which and why instead of exiting 0 with an empty split."""
    from medsr import pipeline

    table = pd.concat([_table(40, 2, "xray"), _table(1, 1, "ct")], ignore_index=True)
    (tmp_path / "data" / "validated").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    table.to_parquet("data/validated/images.parquet", index=False)
    params = {"data": {"split": {"fractions": FRACTIONS, "seed": 1, "min_patients": 3}}}
    with pytest.raises(pipeline.StageFailed, match=r"ct: 1 image\(s\) in 1 file\(s\) after validation, none in test"):
        pipeline.split_stage(params)
    assert not (tmp_path / "data" / "split").exists()
