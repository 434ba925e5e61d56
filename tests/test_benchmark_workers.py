"""The benchmark's scales scored side by side (one spawned process each) give the report one
process gives on one torch thread; only the CPU latency, timed afterwards, is a fresh measurement."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import _image

from medsr.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def without_latency(report: dict[str, Any]) -> dict[str, Any]:
    models = {name: {scale: {k: v for k, v in detail.items() if k != "cpu_latency_ms_256"}
                     for scale, detail in scales.items()} for name, scales in report["models"].items()}
    return {**report, "models": models}


def test_scales_scored_in_two_processes_match_one_process_on_one_thread(tmp_path: Path) -> None:
    from medsr.benchmark import benchmark
    from medsr.consistency import ConsistencySettings
    from medsr.data.pairing import build_pair_sets
    from medsr.training import TrainConfig
    from medsr.training.trainer import train_generator

    params = load_params(REPO_ROOT / "params.yaml")
    params["degrade"]["scales"] = [2, 4]
    rng = np.random.default_rng(11)
    rows = []
    for i, (modality, split) in enumerate([(m, s) for m in ("xray", "mri") for s in ("train", "train", "val", "test")]):
        name = f"img{i}.npy"
        np.save(tmp_path / name, _image(rng, 64 + 8 * (i % 3), 72))
        rows.append({"id": f"{modality}-{i:04d}", "modality": modality, "array": name, "split": split})
    build_pair_sets(pd.DataFrame(rows), tmp_path, tmp_path / "pairs", params["degrade"])
    for scale in (2, 4):
        train_generator(TrainConfig(model="espcn", scale=scale, pairs_root=str(tmp_path / "pairs"),
                                    out_dir=str(tmp_path / f"models/espcn/x{scale}"), steps=8, batch_size=4, lr_patch=8,
                                    val_every=4, checkpoint_every=4, num_workers=0, quiet=True))
    consistency = ConsistencySettings.from_params(params["consistency"])

    def run(workers: int) -> dict[str, Any]:
        return benchmark(["espcn"], [2, 4], tmp_path / "pairs", tmp_path / "models", consistency=consistency,
                         latency_side=32, workers=workers)

    together = run(2)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(1)
    finally:
        torch.set_num_threads(previous)
    assert {r["scale"] for r in together["results"]} == {2, 4}
    assert without_latency(together) == without_latency(alone)
    assert all(detail["cpu_latency_ms_256"] > 0 for scales in together["models"].values() for detail in scales.values())
    assert list(together["models"]["espcn"]["x2"]) == list(alone["models"]["espcn"]["x2"])  # same keys, same order


class _Timed(torch.nn.Module):
    """A network whose forward takes ``seconds`` (sleeps), counting its calls."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_latency_times_three_passes_after_a_warm_up_fewer_when_each_is_slow() -> None:
    from medsr.benchmark import cpu_latency_ms

    fast = _Timed(0.0)
    assert cpu_latency_ms(fast, side=8) >= 0.0 and fast.calls == 1 + 3
    slow = _Timed(0.3)
    latency = cpu_latency_ms(slow, side=8, budget_s=0.5)
    assert slow.calls == 1 + 2  # 0.3 s, then 0.6 s timed: past the budget, no third pass
    assert 300.0 <= latency < 1000.0
    slowest = _Timed(0.6)
    assert cpu_latency_ms(slowest, side=8, budget_s=0.5) >= 600.0 and slowest.calls == 1 + 1
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        cpu_latency_ms(fast, side=8, repeats=0)


def test_networks_are_scored_in_the_layout_training_validated_them_in() -> None:
    """model_outputs and cpu_latency_ms put the weights channels-last (the trainer's layout) and
    change no output beyond float rounding."""
    from torch import nn

    from medsr.benchmark import SCORING_MEMORY_FORMAT, cpu_latency_ms, model_outputs
    from medsr.consistency import ConsistencySettings
    from medsr.inference import predict_image
    from medsr.models import build_generator
    from medsr.training.trainer import TRAINING_MEMORY_FORMAT

    def layouts(module: nn.Module) -> set[bool]:
        return {m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in module.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size[0] > 1}

    assert SCORING_MEMORY_FORMAT == TRAINING_MEMORY_FORMAT
    generator = build_generator("srgan", 2, n_feats=8, n_blocks=1).eval()
    assert layouts(generator) == {False}
    lr = np.random.default_rng(0).random((1, 12, 12), dtype=np.float32)
    contiguous = predict_image(generator, lr)
    outputs = model_outputs(generator, "srgan", 2, ConsistencySettings(steps=0))(lr)
    assert layouts(generator) == {True}
    np.testing.assert_allclose(outputs["srgan"], contiguous, atol=1e-5)
    other = build_generator("srgan", 2, n_feats=8, n_blocks=1)
    cpu_latency_ms(other, side=8, repeats=1)
    assert layouts(other) == {True}
