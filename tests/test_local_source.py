"""The `local` source: it ingests only what the user named, mirrors the folder into data/raw (a
replaced file is refreshed, a deleted one removed), and refuses an empty path, an empty folder
and a file with one line and exit code 1, having copied nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from medsr.data.loading import SUPPORTED_SUFFIXES
from medsr.data.sample_files import sample_file
from medsr.data.sources.errors import SourceError
from medsr.data.sources.local import MANIFEST_NAME, find_local_images, sync_local_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def ct_pixels() -> np.ndarray:
    """A real CT slice (pydicom's CT_small.dcm) as 8-bit grey."""
    stored = pydicom.dcmread(sample_file("pydicom", "CT_small.dcm")).pixel_array.astype(np.float64)
    return np.round((stored - stored.min()) / (stored.max() - stored.min()) * 255).astype(np.uint8)


def write_tiff(path: Path, pixels: np.ndarray) -> None:
    """Uncompressed TIFF: the same shape always gives the same byte size (a same-size replacement)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    Image.fromarray(pixels).save(tmp, format="TIFF")
    os.replace(tmp, path)  # what a copy tool or an editor does: a new file under the old name


def make_folder(root: Path) -> Path:
    pixels = ct_pixels()
    write_tiff(root / "a.tif", pixels)
    write_tiff(root / "sub" / "b.tif", np.flipud(pixels).copy())
    write_tiff(root / "c.tif", np.fliplr(pixels).copy())
    return root


def test_reads_only_images_and_skips_hidden_folders(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    dicom = sample_file("pydicom", "CT_small.dcm")
    (root / "series").mkdir()
    (root / "series" / "1.2.840.10008").write_bytes(dicom.read_bytes())  # a UID-named DICOM: preamble tells
    (root / "series" / "README").write_text("not an image")
    (root / "notes.txt").write_text("not an image")
    (root / "plot.svg").write_text("<svg/>")
    for hidden in (".git/objects/ab", ".dvc/cache/files", ".thumbnails"):
        (root / hidden).mkdir(parents=True)
        write_tiff(root / hidden / "x.tif", ct_pixels())
    (root / ".hidden.tif").write_bytes((root / "a.tif").read_bytes())
    found = {p.relative_to(root).as_posix() for p in find_local_images(root, SUPPORTED_SUFFIXES)}
    assert found == {"a.tif", "c.tif", "sub/b.tif", "series/1.2.840.10008"}


def test_sync_mirrors_replacements_and_deletions(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images")
    dest = tmp_path / "raw" / "xray"
    first = sync_local_images(root, dest, SUPPORTED_SUFFIXES, "xray")
    assert first.counts() == {"added": 3, "changed": 0, "removed": 0, "unchanged": 0}
    assert (dest / MANIFEST_NAME).is_file()

    old_size = (root / "a.tif").stat().st_size
    write_tiff(root / "a.tif", 255 - ct_pixels())
    assert (root / "a.tif").stat().st_size == old_size  # same size, other content
    (root / "sub" / "b.tif").unlink()
    os.utime(root / "c.tif")  # touched only: same bytes
    second = sync_local_images(root, dest, SUPPORTED_SUFFIXES, "xray")
    assert second.counts() == {"added": 0, "changed": 1, "removed": 1, "unchanged": 1}
    assert (dest / "a.tif").read_bytes() == (root / "a.tif").read_bytes()
    assert not (dest / "sub").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST_NAME, "a.tif", "c.tif"])

    third = sync_local_images(root, dest, SUPPORTED_SUFFIXES, "xray")
    assert third.counts() == {"added": 0, "changed": 0, "removed": 0, "unchanged": 2}


@pytest.mark.parametrize(("path", "expected"), [
    ("", "is empty"),
    ("   ", "is empty"),
    ("empty-folder", "holds no image files"),
    ("a-file.tif", "is a file, not a folder"),
    ("no-such-folder", "does not exist"),
])
def test_refused_paths_exit_1_with_one_line_and_copy_nothing(tmp_path: Path, path: str, expected: str) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    (work / "empty-folder").mkdir()
    (work / "empty-folder" / "notes.txt").write_text("no images here")
    write_tiff(work / "a-file.tif", ct_pixels())
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["sources"]["xray"] = {"kind": "local", "local": {"path": path}}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("sources", "download"):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")], cwd=work,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))]
        assert len(lines) == 1 and lines[0].startswith(f"medsr {stage}: data.sources.xray.local.path"), result.stderr
        assert expected in lines[0], lines[0]
        assert "Traceback" not in result.stderr
    raw = work / "data" / "raw"
    assert not raw.exists() or not any(p.is_file() for p in raw.rglob("*")), sorted(raw.rglob("*"))


def test_a_path_overlapping_data_raw_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="overlaps the download folder"):
        sync_local_images(tmp_path, tmp_path / "data" / "raw" / "xray", SUPPORTED_SUFFIXES, "xray")


@pytest.mark.slow
def test_dvc_repro_reflects_a_replaced_and_a_deleted_local_file(tmp_path: Path) -> None:
    from test_pipeline_e2e import copy_repo, dvc, ran_stages

    work = copy_repo(tmp_path / "repo")
    folder = make_folder(tmp_path / "xray-images")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["sources"] = {"xray": {"kind": "local", "local": {"path": str(folder)}}}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = dvc(["repro", "download"], work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    raw = work / "data" / "raw" / "xray"
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.tif")) == ["a.tif", "c.tif", "sub/b.tif"]

    unchanged = dvc(["repro", "download"], work)
    assert ran_stages(unchanged.stdout) == ["sources"], unchanged.stdout  # the stat check only

    write_tiff(folder / "a.tif", 255 - ct_pixels())
    (folder / "sub" / "b.tif").unlink()
    second = dvc(["repro", "download"], work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ran_stages(second.stdout) == ["sources", "download"], second.stdout
    assert (raw / "a.tif").read_bytes() == (folder / "a.tif").read_bytes()
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.tif")) == ["a.tif", "c.tif"]
    summary = json.loads((work / "metrics" / "download.json").read_text())
    assert summary["local_sync"]["xray"] == {"added": 0, "changed": 1, "removed": 1, "unchanged": 1}
    assert "1 changed, 1 removed" in second.stdout + second.stderr
    assert summary["images_per_modality"]["xray"] == 2


def test_links_out_of_the_folder_are_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`evil.dcm -> /etc/passwd` (and a linked folder elsewhere) never reach data/raw; the warning
    names them. A link to a file inside the folder is an ordinary image."""
    root = make_folder(tmp_path / "images")
    elsewhere = tmp_path / "elsewhere"
    write_tiff(elsewhere / "other_patient.tif", ct_pixels())
    (root / "evil.dcm").symlink_to("/etc/passwd")
    (root / "outside.tif").symlink_to(elsewhere / "other_patient.tif")
    (root / "linked_folder").symlink_to(elsewhere, target_is_directory=True)
    (root / "alias.tif").symlink_to(root / "a.tif")
    dest = tmp_path / "raw"
    with caplog.at_level("WARNING", logger="medsr.data.sources.local"):
        report = sync_local_images(str(root), dest, SUPPORTED_SUFFIXES, "xray")
    mirrored = sorted(p.relative_to(dest).as_posix() for p in report.files)
    assert mirrored == ["a.tif", "alias.tif", "c.tif", "sub/b.tif"]
    assert not (dest / "evil.dcm").exists() and not (dest / "outside.tif").exists() and not (dest / "linked_folder").exists()
    assert all(b"root:" not in p.read_bytes() for p in dest.rglob("*") if p.is_file())
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for name in ("evil.dcm", "outside.tif", "linked_folder"):
        assert name in warning, warning


def test_mirror_is_a_copy_that_shares_no_inode_with_the_users_files(tmp_path: Path) -> None:
    """DVC's cache hard-links and write-protects data/raw (.dvc/config): a mirror hard-linked to the
    user's folder would put the user's own files into the cache."""
    root = make_folder(tmp_path / "images")
    dest = tmp_path / "raw"
    sync_local_images(root, dest, SUPPORTED_SUFFIXES)
    for name in ("a.tif", "sub/b.tif", "c.tif"):
        assert (dest / name).read_bytes() == (root / name).read_bytes()
        assert (dest / name).stat().st_ino != (root / name).stat().st_ino
