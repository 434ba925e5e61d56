"""The embedded default source: real medical images that PyPI packages ship.

Nothing is downloaded: the files are copied from installed packages into the raw folder,
each with its provenance (package, version, file, licence) so a result can be traced back.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medsr.atomic import atomic_path, write_json
from medsr.data.sample_files import sample_file
from medsr.data.sources.errors import SourceError


@dataclass(frozen=True)
class SampleFile:
    package: str  # import name
    distribution: str  # PyPI name, for the version and the install hint
    relative: str  # path inside the package folder
    licence: str
    description: str


# The exact files the embedded default uses (issue 2); licences as their packages state them.
SAMPLE_FILES: dict[str, tuple[SampleFile, ...]] = {
    "xray": (
        SampleFile("data_store", "pydicom-data", "data/RG1_UNCI.dcm", "MIT (pydicom-data); image from the DICOM WG04 compression test set",
                   "chest CR, 1955x1841, 15-bit stored, MONOCHROME1"),
    ),
    "ct": (
        SampleFile("data_store", "pydicom-data", "data/eCT_Supplemental.dcm", "MIT (pydicom-data); enhanced CT from the DICOM standard examples",
                   "enhanced CT, 2 frames, 512x512"),
        SampleFile("pydicom", "pydicom", "data/test_files/CT_small.dcm", "MIT (pydicom)", "CT slice, 128x128"),
    ),
    "mri": (
        SampleFile("nilearn", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                   "MNI ICBM 2009a template licence (free use with copyright notice: Copyright (C) 1993-2009 Louis Collins, "
                   "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University); nilearn BSD-3-Clause",
                   "MNI152 brain T1 template, 197x233x189, 1 mm"),
        SampleFile("data_store", "pydicom-data", "data/emri_small.dcm", "MIT (pydicom-data)", "enhanced MR, 10 frames, 64x64"),
        SampleFile("data_store", "pydicom-data", "data/MR2_UNCI.dcm", "MIT (pydicom-data); image from the DICOM WG04 compression test set",
                   "brain MR, 1024x1024, 12-bit"),
    ),
}


def fetch_sample(modality: str, dest: Path) -> list[Path]:
    """Copy the modality's embedded sample files into ``dest`` with a PROVENANCE.json beside them."""
    if modality not in SAMPLE_FILES:
        raise SourceError(f"no embedded sample for modality {modality!r}; choose one of {sorted(SAMPLE_FILES)}")
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    provenance = []
    for item in SAMPLE_FILES[modality]:
        try:
            src = sample_file(item.package, item.relative)
        except FileNotFoundError as err:
            raise SourceError(str(err)) from None
        target = dest / src.name
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        written.append(target)
        provenance.append({
            **asdict(item),
            "version": importlib.metadata.version(item.distribution),
            "file": target.name,
            "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        })
    write_json(dest / "PROVENANCE.json", {"source": "sample", "modality": modality, "files": provenance})
    return written
