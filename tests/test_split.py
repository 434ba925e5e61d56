"""The split never puts one patient in two splits, and is deterministic."""

from __future__ import annotations

import pandas as pd
import pytest

from medsr.data.split import SPLITS, leaked_patients, split_table

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


def test_few_patients_split_by_contiguous_region() -> None:
    # One radiograph cut into a 7x7 grid of tiles: one patient, so region split.
    rows = [{"id": f"x-{y}-{x}", "patient_key": "pk", "modality": "xray", "path": "xray/RG1.dcm", "frame": None,
             "tile_y": y * 256, "tile_x": x * 256} for y in range(7) for x in range(7)]
    out = split_table(pd.DataFrame(rows), FRACTIONS, seed=1)
    assert set(out["split_method"]) == {"region"}
    assert set(out["split"]) == set(SPLITS)
    # Contiguous in scan order: the split changes at most twice along it.
    ordered = out.sort_values(["tile_y", "tile_x"])["split"].tolist()
    changes = sum(a != b for a, b in zip(ordered, ordered[1:]))
    assert changes == 2 and ordered[0] == "train" and ordered[-1] == "test"


@pytest.mark.parametrize("bad", [{"train": -1, "val": 1, "test": 1}, {"train": 0, "val": 0, "test": 0}])
def test_bad_fractions_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_table(_table(10, 1), bad, seed=1)
