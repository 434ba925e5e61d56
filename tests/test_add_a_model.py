"""Adding a model is one file: a toy architecture written as one new file under ``medsr/models/``
of a copy of the package trains on the smoke profile (through the `train` stage's own function),
is benchmarked, and is offered by the CLI, with no other file of the package edited.

The copy runs in a subprocess with the copy first on ``sys.path``, so the package that imports the
new file is the copy and the repository's own ``medsr`` is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

TOY_MODEL = '''
"""Toy: bicubic plus one sub-pixel conv, the smallest learned generator (a test's model)."""

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import SRGenerator, conv2d, shrink_init_
from medsr.ops import bicubic_upsample


@register_architecture("toy", description="bicubic plus one 3x3 sub-pixel conv (a test's model)")
class Toy(SRGenerator):
    def __init__(self, scale: int = 4) -> None:
        super().__init__(scale)
        self.body = nn.Sequential(shrink_init_(conv2d(1, self.scale ** 2, 3)), nn.PixelShuffle(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(bicubic_upsample(x, self.scale), self.body(x))
'''

DRIVER = '''
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

import medsr
assert Path(medsr.__file__).resolve().is_relative_to(Path.cwd().resolve()), medsr.__file__

from medsr.benchmark import benchmark
from medsr.cli import app, trained_model_choices
from medsr.consistency import ConsistencySettings
from medsr.data.pairing import build_pair_sets
from medsr.params import load_params
from medsr.training.stage import code_files, train_stage

# 1. The CLI offers it: the MODEL argument's choices and `medsr models`.
assert "toy" in trained_model_choices(), trained_model_choices()
assert trained_model_choices("to") == ["toy"]
listing = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
assert listing.exit_code == 0 and "toy" in listing.output, listing.output

# 2. It trains on the smoke profile through the train stage (checkpoint, MLflow run, metrics file).
params = load_params("params.yaml")
params["degrade"]["scales"] = [2]
rng = np.random.default_rng(3)
rows = []
for i, (modality, split) in enumerate([(m, s) for m in ("xray", "mri") for s in ("train", "train", "val", "test")]):
    field = gaussian_filter(rng.random((64, 64)), 3.0)
    image = (0.1 + 0.8 * (field - field.min()) / (field.max() - field.min())).astype(np.float32)[None]
    np.save(f"img{i}.npy", image)
    rows.append({"id": f"{modality}-{i:04d}", "modality": modality, "array": f"img{i}.npy", "split": split})
build_pair_sets(pd.DataFrame(rows), Path("."), Path("data/pairs"), params["degrade"])
summary = train_stage(params, "toy", profile="smoke")
result = summary["scales"]["x2"]
assert result["steps_done"] == params["train"]["profiles"]["smoke"]["steps"], result
assert Path("models/toy/x2/best.pt").is_file() and Path("metrics/train/toy.json").is_file()
assert Path("medsr/models/toy.py").resolve() in code_files("toy")  # its own file decides its code version

# 3. It is benchmarked beside bicubic.
report = benchmark(["toy"], [2], Path("data/pairs"), Path("models"), consistency=ConsistencySettings(),
                   latency_side=32)
assert {r["model"] for r in report["results"]} == {"bicubic", "bicubic+consistency", "toy"}, report["results"]
assert report["models"]["toy"]["x2"]["params"] == 2 * 2 * 9 + 2 * 2
print(json.dumps({"trained_steps": result["steps_done"], "rows": len(report["results"])}))
'''


def _copy_package(root: Path) -> None:
    shutil.copytree(REPO_ROOT / "medsr", root / "medsr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")


def test_a_toy_model_in_one_new_file_trains_benchmarks_and_is_a_cli_choice(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "medsr").rglob("*.py")}
    (tmp_path / "medsr" / "models" / "toy.py").write_text(textwrap.dedent(TOY_MODEL))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # No file of the package but the new one was edited.
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "medsr").rglob("*.py")}
    assert set(after) - set(before) == {Path("medsr/models/toy.py")}
    assert all(after[path] == content for path, content in before.items())


def test_the_docs_say_how_to_add_a_model_in_five_lines_or_fewer() -> None:
    page = (REPO_ROOT / "docs" / "models-and-losses.md").read_text()
    section = page.split("## Add a model\n", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in section.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 5, lines
    assert "register_architecture" in section and "train.models" in section
