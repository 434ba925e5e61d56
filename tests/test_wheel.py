"""The distribution: a wheel built from the tree, installed outside the checkout, runs the CLI's
`package` and `schedule` commands and carries the service and the flows they import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medsr.provenance import REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``medsr`` installed from its wheel into a bare folder (offline: no index, no dependencies;
    they come from the running interpreter's environment)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for package in ("medsr", "serving", "flows"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
                    str(source)], check=True, timeout=300)
    wheels = list((root / "dist").glob("medsr-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheels[0])],
                   check=True, timeout=300)
    return site


def run_outside(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``args`` run from a folder that is not the checkout, with only the installed copy importable
    ahead of the environment's packages."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(list(args), cwd=site.parent, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_carries_the_service_and_the_flows(installed: Path) -> None:
    probe = ("import flows.deploy, medsr.cli, serving.packaging, serving.web; "
             "print(medsr.cli.__file__); print(serving.packaging.__file__); print(flows.deploy.__file__); "
             "print(serving.web.STATIC_DIR / 'index.html')")
    result = run_outside(installed, sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert len(paths) == 4
    for path in paths:
        assert path.is_relative_to(installed), path
        assert path.is_file(), path


@pytest.mark.parametrize("command", ["package", "schedule"])
def test_package_and_schedule_run_from_the_wheel(installed: Path, command: str) -> None:
    result = run_outside(installed, str(installed / "bin" / "medsr"), command, "--help")  # the console script
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    assert command in result.stdout
