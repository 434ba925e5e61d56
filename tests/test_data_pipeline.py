"""The data half end to end, on the real embedded sample: ingest, validate with bad files mixed
in, split without leakage, degrade byte-identically; and the DVC pipeline itself."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from medsr.data.ingest import TABLE_NAME, IngestOptions, ingest
from medsr.data.pairing import PairSource, build_pair_sets, check_downscales, training_tiles
from medsr.data.pairs import PairSet, TileSet
from medsr.data.shards import read_ref, read_stored, read_tile, tile_digest
from medsr.data.split import find_leaks, leaked_patients, split_table
from medsr.data.validation import validate_table
from medsr.degradations import resize_bicubic
from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]

PARAMS = load_params(REPO_ROOT / "params.yaml")


def test_sample_ingest_has_every_modality(sample_interim: Path) -> None:
    table = pd.read_parquet(sample_interim / TABLE_NAME)
    assert table["error"].isna().all(), table["error"].dropna().tolist()
    counts = table["modality"].value_counts()
    assert counts["xray"] == 49  # 1955x1841 radiograph -> 7x7 tiles of 256
    assert counts["ct"] >= 9 and counts["mri"] >= 20
    assert table["id"].is_unique
    # The patient key is a hash: no raw DICOM PatientID survives into the table.
    raw_ids = {"9RG1", "0010", "1CT1", "5MR2"}
    assert not raw_ids & set(table["patient_key"])
    # Tiles are stored in their source's type, in a few shards; read back as the float32 contract.
    assert set(table["stored_dtype"]) <= {"uint8", "uint16"}
    assert table["array"].nunique() <= 2 and len(list((sample_interim / "shards").iterdir())) == table["array"].nunique()
    for row in table.sample(5, random_state=0).itertuples():
        pixels = read_tile(sample_interim, row)
        assert pixels.dtype == np.float32 and pixels.shape == (1, row.height, row.width)
        assert tile_digest(read_stored(sample_interim, row)) == row.sha256


def _bad_raw_folder(root: Path, sample_raw: Path) -> dict[str, str]:
    """A raw tree with one good DICOM and one file per kind of bad input; returns name -> expected reason."""
    ct = root / "ct"
    ct.mkdir(parents=True)
    good = sample_raw / "ct" / "CT_small.dcm"
    shutil.copy(good, ct / "good.dcm")
    (ct / "empty.dcm").write_bytes(b"")
    (ct / "truncated.dcm").write_bytes(good.read_bytes()[:2000])
    (ct / "notes.dcm").write_text("this is a text file with a DICOM name\n" * 20)
    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"
    ds.save_as(ct / "unknown_syntax.dcm", enforce_file_format=True)
    mri = root / "mri"
    mri.mkdir()
    volume = np.random.default_rng(0).random((80, 80, 3)).astype(np.float32)
    volume[10, 10, 1] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), mri / "nan.nii.gz")
    xray = root / "xray"
    xray.mkdir()
    Image.fromarray(np.full((128, 128), 77, np.uint8)).save(xray / "constant.png")
    Image.fromarray((np.random.default_rng(1).random((32, 40)) * 255).astype(np.uint8)).save(xray / "tiny.png")
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(xray / "ok.png")
    return {
        "ct/empty.dcm": "empty",
        "ct/truncated.dcm": "",
        "ct/notes.dcm": "DICOM",
        "ct/unknown_syntax.dcm": "1.2.3.4.5.6.7.8.9",
        "mri/nan.nii.gz": "non-finite",
        "xray/constant.png": "constant",
        "xray/tiny.png": "height",
    }


def test_each_bad_input_is_quarantined_with_its_reason(tmp_path: Path, sample_raw: Path) -> None:
    raw = tmp_path / "raw"
    expected = _bad_raw_folder(raw, sample_raw)
    table = ingest(raw, tmp_path / "interim", IngestOptions(tile_size=256, max_pixels=10_000_000), None)
    result = validate_table(table, tmp_path / "interim", min_size=64)
    reasons = result.quarantine.groupby("path")["reason"].apply(" | ".join).to_dict()
    for path, fragment in expected.items():
        assert path in reasons, f"{path} was not quarantined; quarantine: {reasons}"
        assert path in reasons[path]  # the reason names the file
        assert fragment.lower() in reasons[path].lower(), reasons[path]
    # The good files went on: nothing else was lost.
    assert set(result.passed["path"]) == {"ct/good.dcm", "xray/ok.png"}


def test_duplicates_are_judged_within_a_modality_and_the_gate_counts_images(tmp_path: Path, sample_raw: Path) -> None:
    """A copy of the CT sample filed under X-ray keeps both; a second CT copy is a duplicate. An
    image failing two checks is one quarantined image, not two."""
    raw = tmp_path / "raw"
    for folder, name in (("ct", "CT_small.dcm"), ("xray", "ct_copy.dcm"), ("ct", "ct_again.dcm")):
        (raw / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_raw / "ct" / "CT_small.dcm", raw / folder / name)
    tiny_constant = np.full((32, 40), 9, np.uint8)  # fails the size expectation and the pixel check
    Image.fromarray(tiny_constant).save(raw / "xray" / "tiny_constant.png")
    table = ingest(raw, tmp_path / "interim", IngestOptions(tile_size=256, max_pixels=10_000_000), None)
    result = validate_table(table, tmp_path / "interim", min_size=64)
    assert set(result.passed["path"]) == {"ct/CT_small.dcm", "xray/ct_copy.dcm"}
    duplicate = result.quarantine[result.quarantine["check"] == "duplicate"]
    assert duplicate["path"].tolist() == ["ct/ct_again.dcm"]
    tiny = result.quarantine[result.quarantine["path"] == "xray/tiny_constant.png"]
    assert len(tiny) >= 2  # two checks failed...
    assert result.quarantined_images == 2 and result.quarantined_fraction == pytest.approx(2 / len(table))
    assert result.summary["quarantined"] == 2


def test_split_and_degrade_on_the_sample(sample_interim: Path, tmp_path: Path) -> None:
    table = pd.read_parquet(sample_interim / TABLE_NAME)
    validated = validate_table(table, sample_interim, min_size=int(PARAMS["data"]["min_size"]))
    assert validated.quarantined_fraction <= PARAMS["data"]["max_quarantine_fraction"], validated.quarantine
    cfg = PARAMS["data"]["split"]
    split = split_table(validated.passed, cfg["fractions"], seed=1, min_patients=int(cfg["min_patients"]))
    assert leaked_patients(split) == [] and find_leaks(split) == []
    # The radiograph is cut by region (with a gap that no split uses); CT's two files give a whole
    # test file (the other is too small to also hold out a val region); MRI's three files one per split.
    assert set(split.loc[split["modality"] == "xray", "split"]) == {"train", "val", "test", "gap"}
    assert set(split.loc[split["modality"] == "ct", "split"]) == {"train", "test"}
    assert set(split.loc[split["modality"] == "mri", "split"]) == {"train", "val", "test"}
    assert split.loc[split["modality"] != "xray"].groupby("path")["split"].nunique().max() == 1

    small = split.groupby(["modality", "split"]).head(2)  # a few per modality and split keep this quick
    a = build_pair_sets(small, sample_interim, tmp_path / "a", PARAMS["degrade"])
    b = build_pair_sets(small, sample_interim, tmp_path / "b", PARAMS["degrade"])
    assert a == b

    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # byte-identical
    changed = dict(PARAMS["degrade"], seed=int(PARAMS["degrade"]["seed"]) + 1)
    build_pair_sets(small, sample_interim, tmp_path / "c", changed)
    assert digests(tmp_path / "a")["test/x4/realistic/lr.npy"] != digests(tmp_path / "c")["test/x4/realistic/lr.npy"]

    pairs = PairSet(tmp_path / "a" / "test" / "x4" / "realistic")
    lr, hr = pairs.patch(0, 8, np.random.default_rng(0))
    assert lr.shape == (1, 8, 8) and hr.shape == (1, 32, 32)
    tiles = TileSet(tmp_path / "a" / "train" / "hr")
    stored = [p for p in tiles.pairs if "@" not in p["id"]]
    assert len(stored) == int((small["split"] == "train").sum()) and tiles.attrs["recipe"]["blind"] == PARAMS["degrade"]["blind"]
    assert tiles.attrs["downscales"] == PARAMS["degrade"]["train_downscales"]

    # Every training tile is also stored at each downscale: antialiased bicubic of the tile, next to it.
    train = small[small["split"] == "train"].sort_values("id")
    sources = [PairSource.of_row(sample_interim, row) for row in train.itertuples()]
    expected = list(training_tiles(sources, PARAMS["degrade"]["train_downscales"]))
    assert [p["id"] for p in tiles.pairs] == [tile_id for tile_id, _, _ in expected]
    for index, (tile_id, modality, hr) in enumerate(expected):
        if "@" not in tile_id:
            original = read_ref(hr)
            continue
        factor = float(tile_id.split("@")[1])
        size = (round(original.shape[1] * factor), round(original.shape[2] * factor))
        assert tiles.pairs[index]["modality"] == modality and tiles.pairs[index]["hr_shape"] == list(size)
        np.testing.assert_array_equal(tiles.hr(index), resize_bicubic(original, size, antialias=True))
    assert len(tiles) > len(stored)


def test_downscales_must_be_fractions_of_a_tile() -> None:
    assert check_downscales([0.5, 0.25]) == [0.5, 0.25] and check_downscales([]) == []
    for bad in (1.0, 0, -0.5, 2, "0.5", True):
        with pytest.raises(ValueError, match="train_downscales"):
            check_downscales([bad])


@pytest.mark.slow
def test_missing_local_folder_stops_download_with_one_line(tmp_path: Path) -> None:
    params = (REPO_ROOT / "params.yaml").read_text()
    params = params.replace("    kind: sample\n", "    kind: local\n", 1).replace('local: {path: ""}', f'local: {{path: "{tmp_path}/nowhere"}}', 1)
    (tmp_path / "params.yaml").write_text(params)
    proc = subprocess.run([sys.executable, "-m", "medsr.cli", "download"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "nowhere" in lines[0] and "does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "data" / "interim").exists()


def test_a_killed_stage_leaves_no_temporary_output_behind(tmp_path: Path) -> None:
    """kill -9 inside atomic_dir (as during degrade) leaves data/.pairs.*; the next run removes it,
    and leaves alone a temporary that a live process is still writing."""
    import os
    import signal

    from medsr.atomic import atomic_dir

    target = tmp_path / "data" / "pairs"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from pathlib import Path; from medsr.atomic import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'x.npy').write_bytes(b'0' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -signal.SIGKILL
    left = list(target.parent.glob(".pairs.*"))
    assert len(left) == 1 and (left[0] / "x.npy").exists()
    live = target.parent / f".pairs.{os.getppid()}.busy"  # pytest's parent: alive
    live.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "y.npy").write_bytes(b"1")
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["pairs", live.name])
    assert (target / "y.npy").exists()


def test_validation_finds_a_stored_tile_changed_after_ingest(sample_interim: Path, tmp_path: Path) -> None:
    import shutil

    from medsr.data.shards import TileRef, read_samples
    from medsr.data.validation import pixel_problems

    interim = tmp_path / "interim"
    shutil.copytree(sample_interim, interim)
    table = pd.read_parquet(interim / TABLE_NAME)
    row = table.iloc[0]
    assert pixel_problems(row, interim) == []
    ref = TileRef.of_row(interim, row)
    samples = read_samples(ref)
    flipped = samples.copy()
    flipped[0, 5, 5] ^= 1  # one least significant bit of one sample
    data = bytearray(ref.file.read_bytes())
    header = len(data) - np.load(ref.file, mmap_mode="r").size * samples.dtype.itemsize
    at = header + (ref.offset + 5 * ref.width + 5) * samples.dtype.itemsize
    data[at] ^= 1
    ref.file.write_bytes(bytes(data))
    assert np.array_equal(read_samples(ref), flipped)
    assert any("sha256 mismatch" in p for p in pixel_problems(row, interim))
