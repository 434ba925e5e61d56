"""A local folder of DICOM, NIfTI, PNG/JPEG/TIFF files, mirrored into ``data/raw/<modality>``.

* Only what the user named: the path must be set (an empty one would mean "the current
  directory", i.e. the repository with its ``.git``, DVC cache and plots); it must be a folder,
  hold at least one image, and neither be nor contain the repository's ``data/raw``.
* Only images: files with an image suffix, or extension-less / numeric-suffix files that carry
  the DICOM ``DICM`` preamble. Hidden files and folders (``.git``, ``.dvc``, ``.cache`` ...) are
  skipped without being walked.
* A mirror, not an accumulation: ``dest/.medsr-local.json`` records each file's size, mtime and
  sha256 at the last sync. A file whose size or mtime moved is re-hashed and re-linked if its
  content changed (a same-size replacement included); a file gone from the folder is removed
  from ``dest``. What changed is logged as counts (file names can carry patient numbers).

DVC cannot see a folder outside the repository whose path is a parameter that may be empty, so
the ``sources`` stage (:func:`sources_stage`) writes a stat fingerprint of every local folder to
``data/local-sources.json``, a dependency of ``download``: a changed folder reruns the download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsr.atomic import atomic_path, write_json
from medsr.data.sources.errors import SourceError
from medsr.data.sources.transfer import sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = ".medsr-local.json"
FINGERPRINT_PATH = Path("data/local-sources.json")
_KEEP_IN_DEST = (MANIFEST_NAME, ".medsr-source.json")  # the download's own bookkeeping, not mirrored files
_DICOM_MAGIC_OFFSET = 128


@dataclass
class SyncReport:
    """What one sync did, as counts of files (no names: they can identify patients)."""

    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    files: list[Path] = field(default_factory=list, repr=False)  # the mirrored files in dest

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "files"}


def local_folder(path: Any, modality: str, dest: Path | None = None) -> Path:
    """The folder ``data.sources.<modality>.local.path`` names, resolved; SourceError (one line) if
    it is empty, missing, a file, or would swallow ``dest``. A relative path is relative to the
    repository root, where DVC runs the stages."""
    key = f"data.sources.{modality}.local.path"
    text = "" if path is None else str(path).strip()
    if not text:
        raise SourceError(f"{key} is empty: set it to the folder that holds the {modality} images, or use kind: sample")
    root = Path(text).expanduser()
    root = (root if root.is_absolute() else Path.cwd() / root).resolve()
    if not root.exists():
        raise SourceError(f"{key}: {root} does not exist; fix the path in params.yaml")
    if not root.is_dir():
        raise SourceError(f"{key}: {root} is a file, not a folder; name the folder that holds the images")
    if dest is not None:
        target = Path(dest).resolve()
        if target == root or root in target.parents or target in root.parents:
            raise SourceError(f"{key}: {root} overlaps the download folder {target}; name a folder outside data/raw")
    return root


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_image(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    if name.endswith(suffixes):
        return True
    suffix = path.suffix[1:]
    # DICOM folders often name files by UID (numeric "suffix") or with none: only the preamble tells.
    return (not suffix or suffix.isdigit()) and _looks_like_dicom(path)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, its links followed, lies inside ``root`` (``root`` resolved)."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling or looping link
        return False
    return resolved == root or root in resolved.parents


def _walk(root: Path, outside: list[Path] | None = None) -> Iterator[Path]:
    """Files below ``root``, hidden ones skipped; a link that leads out of ``root`` is not followed
    (it could name /etc/passwd or another patient folder) but appended to ``outside``."""
    for folder, dirs, files in os.walk(root):  # symlinked folders are listed, never entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .dvc, .cache: never walked
        for name in sorted(files + [d for d in dirs if (Path(folder) / d).is_symlink()]):
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if path.is_symlink() and not _inside(path, root):
                if outside is not None:
                    outside.append(path)
                continue
            if not path.is_symlink() or path.is_file():
                yield path


def find_local_images(root: Path, suffixes: tuple[str, ...], modality: str = "local") -> list[Path]:
    """Every image file below ``root`` (see the module docstring for what counts), sorted; links
    out of ``root`` are skipped, with one warning line naming them."""
    outside: list[Path] = []
    images = sorted(p for p in _walk(root, outside) if p.is_file() and _is_image(p, suffixes))
    if outside:
        names = ", ".join(p.relative_to(root).as_posix() for p in outside[:10])
        log.warning("local source %s: %d link(s) lead out of %s and are not followed: %s%s; copy the files into "
                    "the folder instead", modality, len(outside), root, names, " ..." if len(outside) > 10 else "")
    return images


def _no_images(root: Path, modality: str, suffixes: tuple[str, ...]) -> SourceError:
    return SourceError(f"data.sources.{modality}.local.path: {root} holds no image files "
                       f"({' '.join(suffixes)}, or DICOM); put the images there or fix the path")


def _read_manifest(dest: Path) -> dict[str, dict[str, Any]]:
    import json

    try:
        loaded = json.loads((dest / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return loaded.get("files", {}) if isinstance(loaded, dict) else {}


def _place(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source``'s content, atomically.

    A copy, not a hard link: DVC's cache hard-links (``.dvc/config``) and write-protects what
    ``data/raw`` holds, so a link here would put the user's own file into the cache (made
    read-only, and corrupted by any later in-place edit of it). The copy costs no more than
    before: with the old copying cache DVC made the same copy when it committed ``data/raw``.
    """
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def sync_local_images(path: Any, dest: Path, suffixes: tuple[str, ...], modality: str = "local") -> SyncReport:
    """Make ``dest`` mirror the image files of the folder ``path`` names; returns what changed.

    Everything is checked before ``dest`` is touched: a refused path copies nothing.
    """
    dest = Path(dest)
    root = local_folder(path, modality, dest)
    images = find_local_images(root, suffixes, modality)
    if not images:
        raise _no_images(root, modality, suffixes)
    recorded = _read_manifest(dest)
    report = SyncReport()
    manifest: dict[str, dict[str, Any]] = {}
    for source in images:
        rel = source.relative_to(root).as_posix()
        target = dest / rel
        stat = source.stat()
        before = recorded.get(rel)
        present = target.is_file() and target.stat().st_size == stat.st_size
        if before and present and before.get("size") == stat.st_size and before.get("mtime_ns") == stat.st_mtime_ns:
            sha = str(before["sha256"])  # size and mtime unchanged since the last sync: not re-read
            report.unchanged += 1
        else:
            sha = sha256_file(source)
            known = before.get("sha256") if before else (sha256_file(target) if present else None)
            if present and known == sha:
                report.unchanged += 1  # touched or copied over with the same bytes
            else:
                _place(source, target)
                if before or present:
                    report.changed += 1
                else:
                    report.added += 1
        manifest[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
        report.files.append(target)
    report.removed = _remove_others(dest, set(manifest))
    write_json(dest / MANIFEST_NAME, {"files": manifest})
    log.info("local source %s: %d added, %d changed, %d removed, %d unchanged (of %d image files)",
             modality, report.added, report.changed, report.removed, report.unchanged, len(images))
    return report


def _remove_others(dest: Path, keep: set[str]) -> int:
    """Delete every file under ``dest`` that is not a mirrored image (nor our bookkeeping)."""
    removed = 0
    for path in sorted(dest.rglob("*"), reverse=True):  # children before their folders
        rel = path.relative_to(dest).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif rel not in keep and rel not in _KEEP_IN_DEST:
            path.unlink()
            removed += 1
    return removed


def folder_fingerprint(root: Path, suffixes: tuple[str, ...]) -> tuple[str, int]:
    """(sha256 (16 hex), count) of the image files' relative names, sizes and mtimes: cheap (a
    stat per file, the DICOM preamble read only for extension-less files), and any replacement,
    edit, addition or deletion moves it."""
    digest = hashlib.sha256()
    count = 0
    for path in _walk(root):
        if not path.is_file() or not _is_image(path, suffixes):
            continue
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        count += 1
    return digest.hexdigest()[:16], count


def sources_stage(params: Mapping[str, Any], suffixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The ``sources`` DVC stage: fingerprint every local source folder into ``data/local-sources.json``.

    DVC runs it on every ``dvc repro`` (``always_changed``); the file only changes, and so the
    download only reruns, when a local folder's images changed. Other kinds are recorded by kind.
    """
    from medsr.params import section

    if suffixes is None:
        from medsr.data.loading import SUPPORTED_SUFFIXES

        suffixes = SUPPORTED_SUFFIXES
    record: dict[str, Any] = {}
    for modality, spec in (section(params, "data.sources") or {}).items():
        kind = (spec or {}).get("kind", "sample")
        if kind != "local":
            record[modality] = {"kind": kind}
            continue
        root = local_folder(((spec or {}).get("local") or {}).get("path"), modality, Path("data/raw") / modality)
        fingerprint, count = folder_fingerprint(root, suffixes)
        if not count:
            raise _no_images(root, modality, suffixes)
        record[modality] = {"kind": kind, "folder": str(root), "images": count, "fingerprint": fingerprint}
    write_json(FINGERPRINT_PATH, record)
    return record
