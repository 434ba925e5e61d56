"""Fine-tuning from published weights (freeze, L2-SP, EMA, clean mix) and the noise-gated choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import smooth_image, write_pair_sets

from medsr.degradations import degrade_bicubic
from medsr.finetune import (FineTuneSettings, NoiseGate, clean_lr, fine_tune, fine_tune_cached, noise_gated,
                            with_weights)
from medsr.models import build_generator
from medsr.inference import predict_image

SCALE = 2
QUICK = dict(steps=3, batch_size=2, lr_patch=16, learning_rate=1e-2)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_sets(tmp_path_factory.mktemp("pairs"), SCALE, hr_size=48, kinds=("standard",))


@pytest.fixture(scope="module")
def start() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator("rlfn", SCALE)


def distance(state: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "trunk.") -> float:
    reference = model.state_dict()
    return float(sum((state[k] - reference[k]).square().sum() for k in state if k.startswith(prefix)))


def test_frozen_layers_keep_the_published_weights_and_the_rest_moves(pairs_root: Path, start) -> None:
    kept = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK, freeze=("conv_1", "block_1")))["step3"]
    assert distance(kept, start, "trunk.conv_1.") == 0 and distance(kept, start, "trunk.block_1.") == 0
    assert distance(kept, start, "trunk.block_2.") > 0
    with pytest.raises(ValueError, match="no parameter of the trunk"):
        fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK, freeze=("block_9",)))


def test_l2sp_keeps_the_weights_nearer_the_start(pairs_root: Path, start) -> None:
    free = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK))["step3"]
    held = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK, l2sp_weight=1e3))["step3"]
    assert 0 < distance(held, start) < 0.5 * distance(free, start)


def test_ema_is_kept_beside_the_raw_weights_and_lags_behind_them(pairs_root: Path, start) -> None:
    kept = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK, ema_decay=0.9), snapshots=(2,))
    assert set(kept) == {"step2", "step2-ema", "step3", "step3-ema"}
    assert 0 < distance(kept["step3-ema"], start) < distance(kept["step3"], start)


def test_a_clean_mix_trains_on_the_clean_tracks_lr(pairs_root: Path, start) -> None:
    hr = torch.from_numpy(smooth_image(np.random.default_rng(0), 32))[None]
    np.testing.assert_allclose(clean_lr(hr, SCALE)[0].numpy(), degrade_bicubic(hr[0].numpy(), SCALE), atol=1e-6)
    # With every sample swapped for its clean LR the run differs from the same run on the stored pairs.
    mixed = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK, clean_fraction=1.0))["step3"]
    plain = fine_tune(start, pairs_root, SCALE, FineTuneSettings(**QUICK))["step3"]
    assert distance(mixed, start) > 0 and any(not torch.equal(mixed[k], plain[k]) for k in plain)


def test_the_gate_uses_the_published_network_on_clean_input_and_the_tuned_one_on_noisy(start) -> None:
    tuned = build_generator("bicubic", SCALE).eval()
    pair = noise_gated(start.eval(), tuned, NoiseGate(threshold=0.005, exponent=8))
    gated = lambda lr: predict_image(pair, lr)  # noqa: E731
    clean = smooth_image(np.random.default_rng(1), 40)
    noisy = np.clip(clean + np.random.default_rng(2).normal(0, 0.02, clean.shape), 0, 1).astype(np.float32)
    np.testing.assert_array_equal(gated(clean), predict_image(start, clean))
    np.testing.assert_array_equal(gated(noisy), predict_image(tuned, noisy))
    # In between, a blend by the consistency step's weight.
    middle = np.clip(clean + np.random.default_rng(3).normal(0, 0.005, clean.shape), 0, 1).astype(np.float32)
    w = pair.weight(middle)
    assert 0.05 < w < 0.95
    np.testing.assert_allclose(gated(middle), w * predict_image(start, middle) + (1 - w) * predict_image(tuned, middle),
                               atol=1e-5)


def test_a_cached_run_is_reused_and_a_changed_recipe_reruns(pairs_root: Path, start, tmp_path: Path) -> None:
    settings = FineTuneSettings(**QUICK)
    first = fine_tune_cached(start, pairs_root, SCALE, settings, (), tmp_path / "run")
    stamp = first["step3"].stat().st_mtime_ns
    assert fine_tune_cached(start, pairs_root, SCALE, settings, (), tmp_path / "run")["step3"].stat().st_mtime_ns == stamp
    again = fine_tune_cached(start, pairs_root, SCALE, FineTuneSettings(**{**QUICK, "learning_rate": 1e-3}), (),
                             tmp_path / "run")
    assert again["step3"].stat().st_mtime_ns != stamp
    assert with_weights(start, again["step3"]).training is False


def test_interpolated_weights_run_from_the_published_to_the_tuned_network(start) -> None:
    from medsr.finetune import interpolated

    torch.manual_seed(1)
    tuned = build_generator("rlfn", SCALE)
    ends = {0.0: start.state_dict(), 1.0: tuned.state_dict()}
    for alpha, expected in ends.items():
        got = interpolated(start, tuned, alpha).state_dict()
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected if k.startswith("trunk."))
    half = interpolated(start, tuned, 0.5).state_dict()
    key = "trunk.conv_2.weight"
    torch.testing.assert_close(half[key], (ends[0.0][key] + ends[1.0][key]) / 2)
    torch.testing.assert_close(half["input_offset_kernel"], start.state_dict()["input_offset_kernel"])


def test_the_shipped_variant_is_the_best_on_noise_of_those_that_keep_the_clean_quality() -> None:
    from medsr.finetune import choose_shipped

    def g(clean: float, noisy: float) -> dict:
        return {"clean": {"gain_db": clean, "images": 16}, "realistic": {"gain_db": noisy, "images": 16}}

    gains = {"published": g(1.0, 0.0), "a": g(0.95, 2.0), "b": g(0.85, 3.0), "c": g(0.92, 2.5)}
    assert choose_shipped(gains, ["a", "b", "c"]) == "c"       # b loses 0.15 dB clean: not eligible
    assert choose_shipped(gains, ["b"]) == "b"                 # none eligible: the best on clean
    assert choose_shipped({**gains, "d": g(0.5, 1.0)}, ["b", "d"]) == "b"
