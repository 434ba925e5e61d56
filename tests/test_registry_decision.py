"""The registry's decision rules as pure functions: no tracking store, plain numbers in, a verdict out."""

from __future__ import annotations

import pytest

from medsr.registry import Candidate, ModalityScore, Scores, choose_best, decide_promotion, is_eligible

CELLS = ("clean/mri", "clean/xray", "realistic/mri", "realistic/xray")


def _scores(test_gain: dict[str, float] | float, val_gain: dict[str, float] | float = 0.2,
            val_ssim: float = 0.01, images: int = 6, val_images: int = 6,
            baseline_gain: dict[str, float] | float = 0.0, baseline_ssim: float = 0.0) -> Scores:
    """Per cell: test and validation gains over bicubic, and the bicubic+consistency baseline's validation gains."""
    def value(v: dict[str, float] | float, cell: str) -> float:
        return v[cell] if isinstance(v, dict) else v

    return Scores({c: ModalityScore(psnr=30 + value(test_gain, c), ssim=0.9, bicubic_psnr=30.0, bicubic_ssim=0.9,
                                    images=images, val_gain_db=value(val_gain, c), val_ssim_gain=val_ssim,
                                    val_images=val_images, val_baseline_gain_db=value(baseline_gain, c),
                                    val_baseline_ssim_gain=baseline_ssim) for c in CELLS}, "index:abc", "benchmark")


def test_eligible_only_when_better_than_bicubic_on_every_track_and_modality() -> None:
    assert is_eligible(Candidate("a", 4, _scores(0.5)))
    # Wins the clean track by a lot, loses the realistic X-ray cell: not better.
    losing_one = {**dict.fromkeys(CELLS, 2.0), "realistic/xray": -0.01}
    assert not is_eligible(Candidate("b", 4, _scores(0.5, losing_one)))
    assert not is_eligible(Candidate("c", 4, _scores(0.5, 0.0)))  # equal to bicubic is not better
    assert not is_eligible(Candidate("d", 4, _scores(0.5, 0.3, val_ssim=-0.01)))  # PSNR up, SSIM down
    assert is_eligible(Candidate("e", 4, _scores(0.5, losing_one)), max_modality_loss_db=0.05)
    assert not is_eligible(Candidate("f", 4, _scores(0.5, val_images=0)))  # nothing validated it


def test_a_gain_that_is_the_consistency_steps_alone_is_refused() -> None:
    # bicubic+consistency gains +0.4 dB on the clean cells and nothing on the noisy ones.
    step = {"clean/mri": 0.4, "clean/xray": 0.4, "realistic/mri": 0.0, "realistic/xray": 0.0}
    # The network adds nothing: its system gain is the step's, to the decimal. Above bicubic everywhere it
    # is not above the baseline anywhere, so it is refused.
    assert not is_eligible(Candidate("srgan", 4, _scores(0.4, {**step, "realistic/mri": 0.01, "realistic/xray": 0.01},
                                                         baseline_gain=step)))
    # Beats bicubic on every cell but falls below the free step on one clean cell.
    assert not is_eligible(Candidate("blimsr", 4, _scores(0.5, {**dict.fromkeys(CELLS, 0.5), "clean/xray": 0.3},
                                                          baseline_gain=step)))
    # SSIM above bicubic's but below the baseline's.
    assert not is_eligible(Candidate("brainsr", 4, _scores(0.5, 0.6, val_ssim=0.01, baseline_gain=step,
                                                           baseline_ssim=0.02)))
    # Above the baseline on every cell: eligible.
    assert is_eligible(Candidate("espcn", 4, _scores(0.5, 0.6, val_ssim=0.03, baseline_gain=step, baseline_ssim=0.02)))
    # No baseline numbers: cannot be judged, so not eligible.
    missing = _scores(0.5, 0.6)
    for score in missing.per_modality.values():
        score.val_baseline_gain_db = None
    assert not is_eligible(Candidate("espcn", 4, missing))


def test_choose_best_ranks_eligible_by_mean_validation_gain_across_cells() -> None:
    strong_but_harmful = Candidate("srgan", 4, _scores(1.0, {**dict.fromkeys(CELLS, 3.0), "clean/xray": -0.2}))
    steady = Candidate("espcn", 4, _scores(0.4, 0.4))
    steadier = Candidate("residual_cnn", 4, _scores(0.3, {**dict.fromkeys(CELLS, 0.5), "clean/mri": 0.45}))
    best, reason = choose_best([strong_but_harmful, steady, steadier])
    assert best is steadier and "2 of 3 that beat bicubic+consistency" in reason
    none, why = choose_best([strong_but_harmful])
    assert none is None and "srgan (clean/xray -0.20 dB vs bicubic+consistency)" in why


def test_compare_moves_the_champion_on_mean_gain_with_a_margin_and_enough_images() -> None:
    champion = _scores(0.30)
    assert decide_promotion(_scores(0.40), champion, min_gain_db=0.05).action == "promote"
    kept = decide_promotion(_scores(0.33), champion, min_gain_db=0.05)
    assert kept.action == "keep" and kept.delta_db == pytest.approx(0.03)
    assert decide_promotion(_scores(0.40), None, min_gain_db=0.05).action == "promote"
    # Cells with too few images do not count: here none is left, so nothing moves.
    few = decide_promotion(_scores(0.9, images=2), _scores(0.3, images=2), min_gain_db=0.05, min_images=5)
    assert few.action == "keep" and few.modalities == []
    # One big cell cannot hide one lost cell's cost: the mean is over cells.
    mixed = _scores({**dict.fromkeys(CELLS, 0.3), "clean/xray": 0.5})
    assert decide_promotion(mixed, champion, 0.0).delta_db == pytest.approx(0.05)
