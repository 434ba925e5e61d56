"""The one-shot GPU benchmark script, run on the CPU with a tiny budget so that it is known to
work before scarce GPU time is spent on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medsr.data.pairs import PairItem, PairSet, write_pairs
from test_training import downscale, write_pair_sets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracked_x2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_pair_sets(tmp_path_factory.mktemp("pairs"), 2, hr_size=48)
    for split in ("val", "test"):
        standard = PairSet(root / "val" / "x2" / "standard")
        clean = [PairItem(p["id"], p["modality"], standard.hr(i).copy(), downscale(standard.hr(i).copy(), 2))
                 for i, p in enumerate(standard.pairs)]
        for track in ("clean", "realistic"):
            write_pairs(root / split / "x2" / track, clean, scale=2)
    return root


def test_bench_gpu_runs_the_full_recipe_within_its_budget_on_cpu(tracked_x2: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "gpu.json"
    result = bench_gpu.main(["--device", "cpu", "--minutes", "0.03", "--models", "swift_srgan", "--scale", "2",
                             "--pairs-root", str(tracked_x2), "--out", str(out), "--val-max-images", "2",
                             "--test-max-images", "2", "--calibration-steps", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    entry = result["models"]["swift_srgan"]
    assert result["setup"]["profile"] == "full" and result["machine"]["device"] == "cpu"
    assert entry["steps_done"] == entry["warmup_steps"] + entry["adversarial_steps"] or entry["stopped_at_limit"]
    assert set(entry["calibrated_steps_per_s"]) == {"warmup", "adversarial"}
    assert entry["steps_per_s"]["warmup"] > 0
    assert "warmup" in entry["test"] and set(entry["test"]["warmup"]) == {"clean", "realistic"}
    assert {"psnr", "ssim", "ms_gmsd"} <= set(entry["test"]["warmup"]["clean"])
    assert entry["kept"]["best"]["phase"] in ("warmup", "adversarial")
