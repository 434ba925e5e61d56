"""User-facing failures of the `medsr` command: one readable line on stderr and exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def medsr(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medsr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env or dict(os.environ))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_unknown_model_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    proc = medsr(["train", "vdsr"], tmp_path)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "vdsr" in line and "espcn" in line and "residual_cnn" in line


def test_missing_kaggle_credentials_stop_download_with_one_line(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["sources"]["xray"]["kind"] = "kaggle"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))
    proc = medsr(["download"], tmp_path, env)
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "KAGGLE" in line and "sample" in line, line
    assert not (tmp_path / "data" / "interim").exists()


def test_missing_params_file_is_named(tmp_path: Path) -> None:
    proc = medsr(["split", "--params", "nowhere.yaml"], tmp_path)
    assert proc.returncode == 1
    assert "nowhere.yaml" in one_line(proc.stderr)


def test_the_fast_yaml_parser_reads_the_repository_files_as_safe_load_does() -> None:
    from medsr.params import parse_yaml

    root = Path(__file__).resolve().parents[1]
    for name in ("params.yaml", "dvc.yaml", "dvc.lock", "prefect.yaml"):
        text = (root / name).read_text()
        assert parse_yaml(text) == yaml.safe_load(text), name
    with pytest.raises(yaml.YAMLError):  # what load_params turns into a ParamsError naming the file
        parse_yaml("a: [1, 2\nb: 3")
    with pytest.raises(yaml.YAMLError):  # safe: no Python objects from tags
        parse_yaml("!!python/object/apply:os.system ['true']")
