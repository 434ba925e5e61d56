"""Find sample files shipped inside installed packages (pydicom, pydicom-data, nilearn, nibabel).

The files are read from the packages' own folders on disk. ``pydicom.data.get_testdata_file`` is
avoided on purpose: for a name it does not hold locally it tries to download, and the network is
closed here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path

# Import names whose distribution (what `pip install` takes) is spelt differently.
_DISTRIBUTION_OF_IMPORT = {"data_store": "pydicom-data", "pydicom_data": "pydicom-data"}


def sample_file(package: str, name: str) -> Path:
    """Return the path of ``name`` inside the installed ``package``.

    ``package`` is an import name (``"pydicom"``, ``"nilearn"``, ``"data_store"``) or a
    distribution name (``"pydicom-data"``); ``name`` is a file name (``"CT_small.dcm"``) or the
    tail of a path inside the package (``"test_files/CT_small.dcm"``), matched on whole path
    parts. The package is located without being imported.

    Raises:
        FileNotFoundError: the package is not installed, or holds no such file; the message
            names the package to install.
    """
    found = _find(package, name.strip("/"))
    if found is None:
        distribution = _DISTRIBUTION_OF_IMPORT.get(package, package)
        raise FileNotFoundError(
            f"sample file {name!r} not found in installed package {package!r}: "
            f"install it with `pip install {distribution}` (or check the file name)"
        )
    return found


@functools.lru_cache(maxsize=256)
def _find(package: str, name: str) -> Path | None:
    wanted = tuple(Path(name).parts)
    for folder in _package_folders(package):
        for directory, _subdirs, files in os.walk(folder):
            if wanted[-1] in files:
                candidate = Path(directory) / wanted[-1]
                if candidate.parts[-len(wanted):] == wanted:
                    return candidate
    for candidate in _distribution_files(package):
        if candidate.parts[-len(wanted):] == wanted and candidate.is_file():
            return candidate
    return None


def _package_folders(package: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def _distribution_files(package: str) -> list[Path]:
    """Files a distribution installed, for a distribution name that is not an import name."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(distribution.locate_file(item)) for item in distribution.files or []]
