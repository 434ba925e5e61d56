"""A local folder of DICOM, NIfTI, PNG/JPEG/TIFF files, read recursively where it lies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medsr.atomic import atomic_path
from medsr.data.sources.errors import SourceError


def find_local_images(folder: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Every file below ``folder`` whose name ends with one of ``suffixes`` (DICOMs may lack one)."""
    root = Path(folder).expanduser()
    if not str(folder).strip():
        raise SourceError("a local source needs `path:` in params.yaml (data.sources.<modality>.local.path), or use kind: sample")
    if not root.is_dir():
        raise SourceError(f"local source folder {root} does not exist: fix data.sources.<modality>.local.path in params.yaml")
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        name = path.name.lower()
        if name.endswith(suffixes) or "." not in name:  # DICOM files often have no extension
            found.append(path)
    return found


def copy_local_images(folder: str | Path, dest: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Bring a local folder's images into ``dest`` (hard links when possible: no second copy on disk)."""
    root = Path(folder).expanduser()
    copied = []
    for path in find_local_images(root, suffixes):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == path.stat().st_size:
            copied.append(target)
            continue
        with atomic_path(target) as tmp:
            try:
                tmp.unlink()
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
        copied.append(target)
    return copied
