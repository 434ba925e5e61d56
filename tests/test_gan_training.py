"""GANs trained as GANs: the adversarial step trains the generator, one set of discriminator
statistics, the learning-rate schedule, EMA, and phase-aware checkpoint selection."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medsr.data.pairs import PairItem, PairSet, write_pairs
from medsr.losses import discriminate_jointly, feature_matching_loss, forward_with_features
from medsr.perceptual import PERCEPTUAL_METRIC
from medsr.training import PatchBatches, TrainConfig, checkpoint_info, load_checkpoint, train_generator
from medsr.training.trainer import _Run, ema_update, lr_factor
from test_training import TINY_SRGAN, config, downscale, write_pair_sets


@pytest.fixture(scope="module")
def tracked_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pair sets with the two evaluation tracks the degrade stage writes for val: clean
    (antialiased bicubic only) and realistic (plus noise)."""
    root = write_pair_sets(tmp_path_factory.mktemp("pairs"), 2)
    standard = PairSet(root / "val" / "x2" / "standard")
    rng = np.random.default_rng(3)
    clean, realistic = [], []
    for i, pair in enumerate(standard.pairs):
        hr = standard.hr(i).copy()
        lr = downscale(hr, 2)
        clean.append(PairItem(pair["id"], pair["modality"], hr, lr))
        noisy = np.clip(lr + rng.normal(0, 0.02, lr.shape), 0, 1).astype(np.float32)
        realistic.append(PairItem(pair["id"], pair["modality"], hr, noisy))
    write_pairs(root / "val" / "x2" / "clean", clean, scale=2)
    write_pairs(root / "val" / "x2" / "realistic", realistic, scale=2)
    return root


def parameters_of(module: nn.Module) -> dict[str, torch.Tensor]:
    # Parameters only: BatchNorm running statistics change in any train-mode forward pass.
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def first_batch(cfg: TrainConfig) -> dict[str, Any]:
    return PatchBatches(cfg.pairs_root, kind="standard", target_scale=cfg.scale, batch_size=cfg.batch_size,
                        lr_patch=cfg.lr_patch, seed=cfg.seed, first_step=1, last_step=1, total_steps=1).batch(1)


@pytest.mark.parametrize("model", ["srgan", "swift_srgan", "brainsr"])
def test_the_adversarial_term_alone_trains_the_generator(tracked_root: Path, tmp_path: Path, model: str) -> None:
    # Every generator loss weight 0 but the adversarial one: only gradient through D reaches G.
    # (The Swift-SRGAN seed scored sr.detach() here, and its GAN phase never trained G.)
    options = TINY_SRGAN if model != "brainsr" else {"model_options": {"n_feats": 8, "n_blocks": 1},
                                                      "discriminator_options": {"features": (8, 8), "hidden": 16}}
    cfg = config(tracked_root, tmp_path / "run", model=model, steps=1, warmup_steps=0, grad_clip=None,
                 loss={"recipe": "srgan", "terms": {"pixel": {"weight": 0.0}, "feature": {"weight": 0.0},
                                                    "tv": {"weight": 0.0}}},
                 adv_weight=1.0, **options)
    run = _Run(cfg)
    before = parameters_of(run.generator)
    run.step = 1
    logged = run.train_step(first_batch(cfg))
    assert set(logged) == {"d_adversarial", "adversarial", "total"}
    after = parameters_of(run.generator)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), f"unchanged generator parameters: {sorted(set(before) - set(changed))}"


def test_real_and_fake_share_the_discriminators_batch_statistics(tracked_root: Path, tmp_path: Path) -> None:
    cfg = config(tracked_root, tmp_path / "run", model="srgan", steps=1, warmup_steps=0,
                 model_options={"n_feats": 8, "n_blocks": 1},
                 discriminator_options={"features": (8, 8, 16, 16), "hidden": 16})
    run = _Run(cfg)
    norms = [m for m in run.discriminator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    seen: list[int] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0])) for m in norms]
    try:
        run.step = 1
        logged = run.train_step(first_batch(cfg))
    finally:
        for handle in handles:
            handle.remove()
    assert "feature_matching" in logged
    # One forward over real + fake in the D step and one in the G step, never a half batch alone.
    assert seen == [2 * cfg.batch_size] * (2 * len(norms))
    assert all(int(m.num_batches_tracked) == 2 for m in norms)


def test_joint_forward_keeps_what_separate_batch_norm_erases() -> None:
    # A fake batch that is the real one plus a constant: separate train-mode BatchNorm passes
    # subtract each half's own mean and make the second layer's features identical, so feature
    # matching sees no difference; one pass over both keeps it. (No padding: a zero border would
    # make the shift uneven.)
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).train()
    real = torch.rand(4, 1, 12, 12)
    fake = (real + 0.3).requires_grad_(True)
    _, real_separate = forward_with_features(d, real)
    _, fake_separate = forward_with_features(d, fake)
    assert feature_matching_loss(fake_separate[1:], real_separate[1:]).item() < 1e-5
    real_logits, fake_logits, real_features, fake_features = discriminate_jointly(d, real, fake, with_features=True)
    assert real_logits.shape == fake_logits.shape == (4, 1) and len(real_features) == len(fake_features) == 2
    joint = feature_matching_loss(fake_features[1:], real_features[1:])
    assert joint.item() > 0.1
    (gradient,) = torch.autograd.grad(joint, fake)
    assert gradient.abs().sum() > 0  # and it trains the generator through the fake half


def test_step_and_cosine_schedules_per_phase() -> None:
    cfg = TrainConfig(model="srgan", scale=2, steps=100, warmup_steps=40, lr_schedule="step", lr_milestones=[0.5],
                      lr_gamma=0.1)
    factors = {step: lr_factor(step, cfg, adversarial=True) for step in (1, 20, 21, 40, 41, 70, 71, 100)}
    # Warm-up 1..40 halves at step 21; the adversarial phase 41..100 restarts at 1, halves at 71.
    assert factors == {1: 1.0, 20: 1.0, 21: pytest.approx(0.1), 40: pytest.approx(0.1), 41: 1.0, 70: 1.0,
                       71: pytest.approx(0.1), 100: pytest.approx(0.1)}
    plain = TrainConfig(model="espcn", scale=2, steps=100, lr_schedule="cosine", lr_gamma=0.01)
    curve = [lr_factor(step, plain, adversarial=False) for step in range(1, 101)]
    assert curve[0] == 1.0 and all(a > b for a, b in zip(curve, curve[1:])) and curve[-1] == pytest.approx(0.01, abs=1e-3)
    assert lr_factor(50, TrainConfig(model="espcn", scale=2, steps=100), adversarial=False) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(model="espcn", scale=2, lr_schedule="linear")


def test_the_schedule_drives_both_optimisers(tracked_root: Path, tmp_path: Path) -> None:
    cfg = config(tracked_root, tmp_path / "run", model="srgan", steps=8, warmup_steps=4, val_every=4,
                 checkpoint_every=4, lr_generator=1e-3, lr_discriminator=2e-3, lr_schedule="step",
                 lr_milestones=[0.5], lr_gamma=0.1, **TINY_SRGAN)
    train_generator(cfg, max_steps_this_run=6)  # step 6: second adversarial step, before the milestone
    paused = load_checkpoint(tmp_path / "run" / "last.pt")
    assert paused["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert paused["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(2e-3)
    train_generator(cfg)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert last["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(2e-4)
    # The adversarial phase may run the generator at its own base rate (SRGAN: 1e-4).
    cfg.out_dir, cfg.lr_generator_adversarial = str(tmp_path / "own"), 3e-4
    train_generator(cfg, max_steps_this_run=2)  # warm-up steps 1-2, before its milestone
    assert load_checkpoint(tmp_path / "own" / "last.pt")["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    train_generator(cfg, max_steps_this_run=3)  # steps 3-4 (warm-up, x0.1), 5 (first adversarial step)
    assert load_checkpoint(tmp_path / "own" / "last.pt")["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(3e-4)


def test_ema_update_is_the_exponential_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    old = parameters_of(ema)
    model[1].running_mean.fill_(0.7)
    ema_update(ema, model, 0.9)
    for name, current in model.named_parameters():
        expected = 0.9 * old[name] + 0.1 * current.detach()
        assert torch.allclose(dict(ema.named_parameters())[name], expected, atol=1e-7), name
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_ema_weights_are_kept_and_measured_against_the_raw_ones(tracked_root: Path, tmp_path: Path) -> None:
    cfg = config(tracked_root, tmp_path / "run", model="srgan", steps=6, warmup_steps=3, val_every=3,
                 checkpoint_every=3, ema_decay=0.5, **TINY_SRGAN)
    result = train_generator(cfg)
    last = load_checkpoint(result.last_checkpoint)
    assert not all(torch.equal(last["generator"][k], last["generator_ema"][k]) for k in last["generator"])
    assert all("raw" in entry and "val_psnr" in entry["raw"] for entry in result.history)
    final = result.history[-1]
    assert final["raw"]["val_psnr"] != final["val_psnr"]
    best = load_checkpoint(result.best_checkpoint)
    assert best["selection"]["weights"] == "ema"
    if best["step"] == 6:
        for key, value in best["generator"].items():
            assert torch.equal(value, last["generator_ema"][key]), key


def test_gan_keeps_warmup_and_adversarial_checkpoints_with_phase_and_step(tracked_root: Path, tmp_path: Path) -> None:
    cfg = config(tracked_root, tmp_path / "run", model="srgan", steps=12, warmup_steps=6, val_every=3,
                 checkpoint_every=6, **TINY_SRGAN)
    result = train_generator(cfg)
    assert [(h["step"], h["phase"]) for h in result.history] == [(3, "warmup"), (6, "warmup"), (9, "adversarial"),
                                                                  (12, "adversarial")]
    entry = result.history[-1]
    assert set(entry["val"]) == {"clean", "realistic"} and set(result.bicubic_val) == {"clean", "realistic"}
    assert entry["val_gain_db"] == pytest.approx(np.mean([entry["val"][t]["psnr"] - result.bicubic_val[t]["psnr"]
                                                          for t in ("clean", "realistic")]))
    warmup = result.checkpoints["warmup"]
    assert warmup["phase"] == "warmup" and warmup["step"] in (3, 6)
    gains = {h["step"]: h["val_gain_db"] for h in result.history if h["phase"] == "warmup"}
    assert warmup["step"] == max(gains, key=gains.get)
    info = checkpoint_info(result.best_checkpoint)
    assert {"step", "phase", "best_val_psnr", "feature_loss"} <= set(info)
    assert (info["phase"], info["step"]) == (result.best_phase, result.best_step)
    adversarial = result.checkpoints.get("adversarial")
    if adversarial is not None:
        assert adversarial["above_fidelity_floor"] and result.best_phase == "adversarial"
        assert checkpoint_info(tmp_path / "run" / "adversarial.pt")["phase"] == "adversarial"
    else:
        assert result.best_phase == "warmup"
    assert checkpoint_info(tmp_path / "run" / "warmup.pt")["phase"] == "warmup"


def test_plain_model_best_is_the_best_mean_gain_over_bicubic(tracked_root: Path, tmp_path: Path) -> None:
    result = train_generator(config(tracked_root, tmp_path / "run", steps=12, val_every=3))
    gains = {h["step"]: h["val_gain_db"] for h in result.history}
    assert result.best_step == max(gains, key=gains.get) and result.best_phase == "pixel"
    assert set(result.checkpoints) == {"best"} and not (tmp_path / "run" / "warmup.pt").exists()


def synthetic_entry(run: _Run, step: int, phase: str, clean: float, realistic: float, score: float) -> dict[str, Any]:
    val = {"clean": {"psnr": clean, "ssim": 0.9, PERCEPTUAL_METRIC: score},
           "realistic": {"psnr": realistic, "ssim": 0.8, PERCEPTUAL_METRIC: score}}
    run.step = step
    return {"step": step, "phase": phase, "val": val, **run._summary(val)}


def test_selection_never_ships_an_adversarial_checkpoint_below_the_fidelity_floor(tracked_root: Path,
                                                                                  tmp_path: Path) -> None:
    run = _Run(config(tracked_root, tmp_path / "run", model="srgan", steps=40, warmup_steps=10, **TINY_SRGAN))
    run.out_dir.mkdir(parents=True)
    run.bicubic_val = {"clean": {"psnr": 30.0}, "realistic": {"psnr": 28.0}}
    assert run._select(synthetic_entry(run, 10, "warmup", 31.0, 28.5, 0.20)) == ["warmup", "best"]
    # The sharpest-looking adversarial weights, but below bicubic on the clean track: never kept.
    assert run._select(synthetic_entry(run, 20, "adversarial", 29.9, 29.5, 0.01)) == []
    assert run.kept["best"]["phase"] == "warmup" and "adversarial" not in run.kept
    # Above the floor with a better perceptual score: shipped.
    assert run._select(synthetic_entry(run, 30, "adversarial", 30.2, 28.1, 0.15)) == ["adversarial", "best"]
    # Better perceptual score again, but below the floor: the step-30 model stays.
    assert run._select(synthetic_entry(run, 40, "adversarial", 29.0, 28.9, 0.05)) == []
    assert (run.kept["best"]["step"], run.kept["best"]["phase"]) == (30, "adversarial")
    info = checkpoint_info(run.best_path)
    assert (info["phase"], info["step"]) == ("adversarial", 30) and info["selection"]["above_fidelity_floor"]
    assert checkpoint_info(run.out_dir / "warmup.pt")["step"] == 10


def test_no_worker_process_outlives_a_run(tracked_root: Path, tmp_path: Path) -> None:
    class Stop(RuntimeError):
        pass

    def stop(_entry: dict[str, Any]) -> None:
        raise Stop

    # An exception leaving the loop, kept with its traceback (as pytest.raises keeps it): the
    # traceback holds the training frame, so nothing but an explicit shutdown stops the workers.
    with pytest.raises(Stop) as kept:
        train_generator(config(tracked_root, tmp_path / "a", steps=12, val_every=2, num_workers=2), on_epoch=stop)
    assert kept.value is not None
    assert multiprocessing.active_children() == []
    # A pause in the middle of the loader's range leaves batches unread.
    paused = train_generator(config(tracked_root, tmp_path / "b", steps=12, num_workers=2), max_steps_this_run=3)
    assert paused.steps_done == 3 and multiprocessing.active_children() == []
