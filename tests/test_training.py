"""The training loop: learning, adversarial warm-up, resume, checkpoint safety, NaN, early stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsr.data import ContractError
from medsr.data.pairing import training_recipe
from medsr.data.pairs import PairItem, PairSet, write_pairs, write_tiles
from medsr.losses import NO_PERCEPTUAL_NOTE
from medsr.inference import predict_image
from medsr.models import build_generator
from medsr.params import load_params
from medsr.training import (
    CheckpointError,
    NonFiniteLossError,
    PatchBatches,
    TrainConfig,
    checkpoint_info,
    load_checkpoint,
    load_generator,
    train_generator,
)
from medsr.training.trainer import score_track


TINY_SRGAN = {"model_options": {"n_feats": 8, "n_blocks": 1},
              "discriminator_options": {"features": (8, 8), "hidden": 16}}


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth synthetic slice: a few Gaussian blobs plus a grating, scaled into [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size), np.float32)
    for _ in range(4):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        sigma, amplitude = rng.uniform(0.05, 0.2), rng.uniform(0.2, 0.6)
        image += amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
    image += 0.15 * np.sin(2 * np.pi * rng.uniform(2, 5) * xx + rng.uniform(0, 6))
    image -= image.min()
    return (image / image.max())[None].astype(np.float32)


def downscale(image: np.ndarray, scale: int) -> np.ndarray:
    small = F.interpolate(torch.from_numpy(image)[None], scale_factor=1 / scale, mode="bicubic", antialias=True)
    return small.clamp(0, 1)[0].numpy()


RECIPE = training_recipe(load_params(Path(__file__).resolve().parents[1] / "params.yaml")["degrade"])


def write_pair_sets(root: Path, scale: int, *, hr_size: int = 32, count: int = 6,
                    kinds: tuple[str, ...] = ("standard",)) -> Path:
    """From smooth synthetic images: the training tiles at ``root/train/hr`` (with params.yaml's
    training recipe) and validation pair sets at ``root/val/x<scale>/<kind>``."""
    rng = np.random.default_rng(scale)
    tiles = [(f"train-{i}", ("ct", "mri")[i % 2], smooth_image(rng, hr_size)) for i in range(count)]
    write_tiles(root / "train" / "hr", tiles, {"split": "train", "recipe": RECIPE})
    items: dict[str, list[PairItem]] = {kind: [] for kind in kinds}
    for i in range(count):
        hr = smooth_image(rng, hr_size)
        lr = downscale(hr, scale)
        noisy = np.clip(lr + rng.normal(0, 0.03, lr.shape), 0, 1).astype(np.float32)
        candidates = {"standard": (hr, lr), "clean": (hr, lr), "realistic": (hr, noisy)}
        for kind in kinds:
            items[kind].append(PairItem(f"val-{i}", ("ct", "mri")[i % 2], *candidates[kind]))
    for kind in kinds:
        write_pairs(root / "val" / f"x{scale}" / kind, items[kind], scale=scale)
    return root


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_sets(tmp_path_factory.mktemp("pairs"), 2)


def config(pairs_root: Path, out_dir: Path, model: str = "espcn", **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(model=model, scale=2, pairs_root=str(pairs_root), out_dir=str(out_dir), steps=12,
                                  batch_size=4, lr_patch=8, lr_generator=1e-3, val_every=4, checkpoint_every=4,
                                  seed=7, quiet=True)
    values.update(overrides)
    return TrainConfig(**values)


def generator_state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["generator"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_step_lowers_the_loss_on_its_batch(pairs_root: Path, tmp_path: Path) -> None:
    cfg = config(pairs_root, tmp_path / "run", steps=1, lr_generator=1e-4, augment=False)
    batch = PatchBatches(cfg.pairs_root, kind="standard", target_scale=2, batch_size=cfg.batch_size,
                         lr_patch=cfg.lr_patch, seed=cfg.seed, first_step=1, last_step=1, total_steps=1,
                         augment=False).batch(1)
    torch.manual_seed(cfg.seed)  # the trainer's initialisation
    initial = build_generator("espcn", 2)
    result = train_generator(cfg)
    trained = build_generator("espcn", 2)
    trained.load_state_dict(generator_state(result.last_checkpoint))
    with torch.no_grad():
        before = F.l1_loss(initial(batch["lr"]), batch["hr"]).item()
        after = F.l1_loss(trained(batch["lr"]), batch["hr"]).item()
    assert result.steps_done == 1 and result.history[0]["losses"]["pixel_l1"] == pytest.approx(before, rel=1e-5)
    assert after < before


def test_espcn_learns_beyond_its_bicubic_start(pairs_root: Path, tmp_path: Path) -> None:
    result = train_generator(config(pairs_root, tmp_path / "run", steps=40, val_every=20, checkpoint_every=40))
    torch.manual_seed(7)
    untrained = build_generator("espcn", 2)
    start = score_track(lambda lr: predict_image(untrained, lr), PairSet(pairs_root / "val" / "x2" / "standard"))
    assert result.best_val_psnr > start["psnr"] + 0.3
    assert set(result.history[-1]["val_per_modality"]) == {"ct", "mri"}
    assert result.feature_loss_used == "not used (pixel loss only)"


def test_adversarial_run_warms_up_then_alternates_and_keeps_the_best(pairs_root: Path, tmp_path: Path) -> None:
    cfg = config(pairs_root, tmp_path / "run", model="srgan", steps=12, warmup_steps=6, val_every=3,
                 checkpoint_every=6, **TINY_SRGAN)
    result = train_generator(cfg)
    phases = [(h["step"], h["phase"]) for h in result.history]
    assert phases == [(3, "warmup"), (6, "warmup"), (9, "adversarial"), (12, "adversarial")]
    assert set(result.history[1]["losses"]) == {"pixel_mse"}
    assert {"adversarial", "d_adversarial", "feature_matching", "pixel_mse", "tv"} <= set(result.history[-1]["losses"])
    assert result.feature_loss_used == NO_PERCEPTUAL_NOTE
    last = load_checkpoint(result.last_checkpoint)
    assert int(last["optimizer_d"]["state"][0]["step"]) == 6  # D trained only after the warm-up
    assert int(last["optimizer_g"]["state"][0]["step"]) == 12
    # A pair root without the clean/realistic tracks is validated on val/standard alone, and that
    # track is then the fidelity floor's too.
    assert set(result.history[-1]["val"]) == {"standard"}
    # best.pt really is the model that scored best_val_psnr, and says which phase it comes from.
    best = load_generator(result.best_checkpoint, "cpu")
    assert not best.training
    rescored = score_track(lambda lr: predict_image(best, lr), PairSet(pairs_root / "val" / "x2" / "standard"))
    assert rescored["psnr"] == pytest.approx(result.best_val_psnr, abs=1e-6)
    info = checkpoint_info(result.best_checkpoint)
    assert (info["step"], info["phase"]) == (result.best_step, result.best_phase)
    if result.best_phase == "warmup":  # no adversarial validation beat bicubic on the floor track
        assert not any(h["above_fidelity_floor"] for h in result.history if h["phase"] == "adversarial")
        assert result.best_val_psnr == max(h["val_psnr"] for h in result.history if h["phase"] == "warmup")


def test_perceptual_loss_is_used_only_with_a_weights_file(pairs_root: Path, tmp_path: Path) -> None:
    from medsr.losses import vgg19_feature_layers

    weights = tmp_path / "vgg19.pth"
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg19_feature_layers().state_dict().items()}, weights)
    result = train_generator(config(pairs_root, tmp_path / "run", model="srgan", steps=3, warmup_steps=1,
                                    val_every=3, checkpoint_every=3, feature_weights=str(weights), **TINY_SRGAN))
    assert result.feature_loss_used == f"vgg19 perceptual ({weights})"
    assert "perceptual" in result.history[-1]["losses"] and "feature_matching" not in result.history[-1]["losses"]
    with pytest.raises(FileNotFoundError, match="do not exist"):
        train_generator(config(pairs_root, tmp_path / "missing", model="srgan", steps=2,
                               feature_weights=str(tmp_path / "nope.pth"), **TINY_SRGAN))


def test_resume_after_a_kill_continues_to_the_same_final_step_and_weights(pairs_root: Path, tmp_path: Path) -> None:
    uninterrupted = train_generator(config(pairs_root, tmp_path / "a", val_every=2, checkpoint_every=4))

    class Killed(RuntimeError):
        pass

    def kill_at_step_6(entry: dict[str, Any]) -> None:
        if entry["step"] == 6:
            raise Killed

    killed_cfg = config(pairs_root, tmp_path / "b", val_every=2, checkpoint_every=4)
    with pytest.raises(Killed):
        train_generator(killed_cfg, on_epoch=kill_at_step_6)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 4  # steps 5-6 were lost with the kill
    resumed = train_generator(killed_cfg)
    assert resumed.resumed_from_step == 4 and resumed.steps_done == 12 and resumed.finished
    assert [h["step"] for h in resumed.history] == [2, 4, 6, 8, 10, 12]
    assert [h["val_psnr"] for h in resumed.history] == [h["val_psnr"] for h in uninterrupted.history]
    assert_same_weights(generator_state(resumed.last_checkpoint), generator_state(uninterrupted.last_checkpoint))
    assert_same_weights(generator_state(resumed.best_checkpoint), generator_state(uninterrupted.best_checkpoint))

    # A pause (max_steps_this_run) checkpoints where it stops; a finished run is not trained again.
    paused_cfg = config(pairs_root, tmp_path / "c", val_every=2, checkpoint_every=4)
    paused = train_generator(paused_cfg, max_steps_this_run=5)
    assert paused.steps_done == 5 and not paused.finished and load_checkpoint(paused.last_checkpoint)["step"] == 5
    finished = train_generator(paused_cfg)
    assert finished.resumed_from_step == 5 and finished.steps_done == 12
    assert [h["losses"] for h in finished.history] == [h["losses"] for h in uninterrupted.history]
    assert_same_weights(generator_state(finished.last_checkpoint), generator_state(uninterrupted.last_checkpoint))
    again = train_generator(paused_cfg)
    assert again.resumed_from_step == 12 and again.steps_done == 12 and len(again.history) == 6


def test_adversarial_resume_matches_an_uninterrupted_run(pairs_root: Path, tmp_path: Path) -> None:
    common = dict(model="srgan", steps=8, warmup_steps=3, val_every=4, checkpoint_every=4, **TINY_SRGAN)
    whole = train_generator(config(pairs_root, tmp_path / "a", **common))
    train_generator(config(pairs_root, tmp_path / "b", **common), max_steps_this_run=5)
    resumed = train_generator(config(pairs_root, tmp_path / "b", **common))
    assert resumed.resumed_from_step == 5
    a, b = load_checkpoint(whole.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert_same_weights(a["generator"], b["generator"])
    assert_same_weights(a["discriminator"], b["discriminator"])


def test_same_seed_same_weights_and_workers_do_not_change_the_data(pairs_root: Path, tmp_path: Path) -> None:
    first = train_generator(config(pairs_root, tmp_path / "a", steps=6))
    second = train_generator(config(pairs_root, tmp_path / "b", steps=6))
    assert_same_weights(generator_state(first.last_checkpoint), generator_state(second.last_checkpoint))
    with_workers = train_generator(config(pairs_root, tmp_path / "w", steps=6, num_workers=2))
    assert_same_weights(generator_state(first.last_checkpoint), generator_state(with_workers.last_checkpoint))
    other_seed = train_generator(config(pairs_root, tmp_path / "c", steps=6, seed=8))
    assert not torch.equal(generator_state(first.last_checkpoint)["body.0.weight"],
                           generator_state(other_seed.last_checkpoint)["body.0.weight"])


def test_checkpoint_of_another_model_or_scale_is_refused_clearly(pairs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_generator(config(pairs_root, out, steps=2))
    with pytest.raises(CheckpointError) as error:
        train_generator(config(pairs_root, out, model="residual_cnn", model_options={"n_feats": 8}))
    message = str(error.value)
    assert str(out / "last.pt") in message and "holds espcn x2" in message and "expects residual_cnn x2" in message

    payload = load_checkpoint(out / "last.pt")
    payload.pop("format")
    payload["fingerprint"] = "0123456789abcdef"  # same name and scale, different layers
    torch.save({"format": "medsr-checkpoint/1", **payload}, out / "last.pt")
    with pytest.raises(CheckpointError, match="architecture 0123456789abcdef"):
        train_generator(config(pairs_root, out, steps=4))
    with pytest.raises(CheckpointError, match="model definition changed"):
        load_generator(out / "last.pt")


def test_corrupt_checkpoint_gives_a_clear_error(pairs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_generator(config(pairs_root, out, steps=2))
    data = result.last_checkpoint.read_bytes()
    result.last_checkpoint.write_bytes(data[: len(data) // 2])  # truncated by a crash or a full disk
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt or not a MedSR checkpoint"):
        train_generator(config(pairs_root, out, steps=4))
    result.last_checkpoint.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_generator(result.last_checkpoint)
    torch.save({"weights": torch.zeros(1)}, result.last_checkpoint)  # readable, but not ours
    with pytest.raises(CheckpointError, match="not a MedSR checkpoint"):
        load_generator(result.last_checkpoint)


def test_nan_in_the_data_stops_the_run_before_a_checkpoint(tmp_path: Path) -> None:
    root = write_pair_sets(tmp_path / "pairs", 2, kinds=("standard",))
    hr = np.load(root / "train" / "hr" / "hr.npy", mmap_mode="r+")
    hr[:] = np.nan  # corrupt the stored tiles behind the writer's contract check
    hr.flush()
    out = tmp_path / "run"
    # The patch's degradation checks the contract: the run stops before its first step.
    with pytest.raises(ContractError, match="contains NaN"):
        train_generator(config(root, out))
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_nan_in_an_adversarial_step_names_the_term(pairs_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import medsr.losses.pixel

    # The TV term (adversarial phase only) turns NaN; its weight itself could not be NaN (refused).
    monkeypatch.setattr(medsr.losses.pixel, "total_variation_loss", lambda x, reduction: x.sum() * float("nan"))
    cfg = config(pairs_root, tmp_path / "run", model="srgan", steps=6, warmup_steps=2, checkpoint_every=2,
                 **TINY_SRGAN)
    with pytest.raises(NonFiniteLossError, match=r"srgan x2: loss term 'tv' is nan at step 3"):
        train_generator(cfg)
    # The last checkpoint is the healthy warm-up state of step 2.
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 2
    assert all(torch.isfinite(t).all() for t in last["generator"].values() if t.is_floating_point())


def test_early_stopping_when_validation_psnr_stalls(pairs_root: Path, tmp_path: Path) -> None:
    cfg = config(pairs_root, tmp_path / "run", steps=30, lr_generator=0.0, val_every=1, checkpoint_every=10,
                 early_stopping_patience=2)
    result = train_generator(cfg)
    assert result.stopped_early and result.finished
    assert result.steps_done == 3 and result.best_step == 1  # step 1 set the best, 2 and 3 did not beat it
    assert load_checkpoint(result.last_checkpoint)["stopped_early"]
    again = train_generator(cfg)
    assert again.steps_done == 3 and again.stopped_early  # not restarted
    patient = train_generator(config(pairs_root, tmp_path / "patient", steps=6, lr_generator=0.0, val_every=1))
    assert patient.steps_done == 6 and not patient.stopped_early


def test_residual_cnn_trains_on_ssl_pairs_and_is_validated_lr_to_hr(tmp_path: Path) -> None:
    root = write_pair_sets(tmp_path / "pairs", 2, kinds=("standard",))
    result = train_generator(config(root, tmp_path / "run", model="residual_cnn", steps=4,
                                    model_options={"n_feats": 8}))
    val = PairSet(root / "val" / "x2" / "standard")
    generator = load_generator(result.best_checkpoint)
    rescored = score_track(lambda lr: predict_image(generator, lr), val)
    assert rescored["psnr"] == pytest.approx(result.best_val_psnr, abs=1e-6)
    assert predict_image(generator, val.lr(0)).shape == val.hr(0).shape


def test_training_pairs_overrides_the_models_own_pair_set(tmp_path: Path) -> None:
    # residual_cnn's own pairs are ssl; train.models.residual_cnn.x2.training_pairs: standard trains it on HR targets.
    root = write_pair_sets(tmp_path / "pairs", 2, kinds=("standard",))
    params = {"seed": 7, "train": {"pairs_root": str(root), "steps": 2, "batch_size": 4, "lr_patch": 8,
                                   "val_every": 2, "checkpoint_every": 2, "quiet": True,
                                   "models": {"residual_cnn": {"model_options": {"n_feats": 8},
                                                               "x2": {"training_pairs": "standard"}}}}}
    cfg = TrainConfig.from_params(params, "residual_cnn", 2, out_dir=str(tmp_path / "run"))
    assert cfg.training_pairs == "standard" and cfg.model_options == {"n_feats": 8}
    other = TrainConfig.from_params(params, "residual_cnn", 4)  # "x2" settings are x2's alone
    assert other.training_pairs is None and other.model_options == {"n_feats": 8}
    result = train_generator(cfg)
    assert result.steps_done == 2 and result.best_checkpoint is not None
    with pytest.raises(ValueError, match="training_pairs"):
        config(root, tmp_path / "bad", model="residual_cnn", training_pairs="paired")


def test_brainsr_curriculum_moves_from_x2_to_target_and_from_standard_to_blind(tmp_path: Path) -> None:
    write_pair_sets(tmp_path / "pairs", 2)
    root = write_pair_sets(tmp_path / "pairs", 4, hr_size=48)  # its 48-px tiles serve both scales
    from medsr.models.brainsr import curriculum_stage

    batches = PatchBatches(root, kind="standard", target_scale=4, batch_size=8, lr_patch=6, seed=1, first_step=1,
                           last_step=10, total_steps=10, curriculum=curriculum_stage)
    first, last = batches.batch(1), batches.batch(10)
    assert first["scale"] == 2 and first["hr"].shape == (8, 1, 12, 12) and first["blind_fraction"] == 0.0
    assert last["scale"] == 4 and last["hr"].shape == (8, 1, 24, 24) and last["blind_fraction"] == 1.0
    scales = [b["scale"] for b in batches]
    assert scales == sorted(scales) and set(scales) == {2, 4}

    result = train_generator(TrainConfig(
        model="brainsr", scale=4, pairs_root=str(root), out_dir=str(tmp_path / "run"), steps=4, warmup_steps=2,
        batch_size=2, lr_patch=6, val_every=2, checkpoint_every=4, quiet=True,
        model_options={"n_feats": 8, "n_blocks": 1}, discriminator_options={"features": (8, 8), "hidden": 16}))
    assert [(h["step"], h["scale"], h["phase"]) for h in result.history] == [(2, 2, "warmup"), (4, 4, "adversarial")]
    assert predict_image(load_generator(result.best_checkpoint), np.zeros((1, 12, 12), np.float32)).shape == (1, 48, 48)


def test_config_from_params_layers_and_rejects_typos() -> None:
    params = {"seed": 99, "train": {
        "profile": "smoke", "out_root": "models", "batch_size": 2,
        "loss": {"recipe": "srgan", "terms": {"adversarial": {"weight": 0.01}}},
        "profiles": {"smoke": {"steps": 20, "batch_size": 4}, "full": {"steps": 1000}},
        "models": {"srgan": {"warmup_steps": 5, "loss": {"terms": {"adversarial": {"relativistic": True}}}}}}}
    cfg = TrainConfig.from_params(params, "srgan", 4)
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.seed) == (20, 4, 5, 99)
    assert cfg.loss == {"recipe": "srgan", "terms": {"adversarial": {"weight": 0.01, "relativistic": True}}}
    with pytest.raises(ValueError, match=r"train.loss: unknown keys \['weights'\]"):
        TrainConfig.from_params({"train": {"loss": {"weights": {"tv": 0}}}}, "espcn", 2)
    assert cfg.out_dir == "models/srgan/x4" and cfg.profile == "smoke"
    assert TrainConfig.from_params(params, "espcn", 2, profile="full").steps == 1000
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_params({"train": {"stpes": 3}}, "espcn", 2)
    with pytest.raises(ValueError, match="profile 'huge' is not defined"):
        TrainConfig.from_params(params, "espcn", 2, profile="huge")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(model="srgan", scale=2, steps=5, warmup_steps=6)


def test_profile_may_size_one_model_and_that_wins() -> None:
    params = {"train": {
        "profiles": {"sample": {"steps": 300, "batch_size": 16,
                                "models": {"srgan": {"steps": 160, "model_options": {"n_blocks": 4}}}}},
        "models": {"srgan": {"steps": 50, "model_options": {"n_feats": 32}}}}}
    srgan = TrainConfig.from_params(params, "srgan", 2, profile="sample")
    assert (srgan.steps, srgan.batch_size) == (160, 16)
    assert srgan.model_options == {"n_feats": 32, "n_blocks": 4}  # merged key by key
    assert TrainConfig.from_params(params, "espcn", 2, profile="sample").steps == 300


def test_clean_fraction_replaces_that_share_of_lrs_by_the_clean_degradation_of_the_same_patches(tmp_path: Path) -> None:
    from medsr.degradations import degrade_bicubic

    root = write_pair_sets(tmp_path, 2, hr_size=32, count=6)  # "blind" LRs carry noise and blur

    def batch(fraction: float, step: int) -> dict[str, Any]:
        return PatchBatches(root, kind="blind", target_scale=2, batch_size=32, lr_patch=8, seed=3, first_step=1,
                            last_step=4, total_steps=4, augment=False, clean_fraction=fraction).batch(step)

    for step in (1, 2):
        noisy, half, clean = batch(0.0, step), batch(0.5, step), batch(1.0, step)
        # The same patches whatever the fraction (its draws have their own stream): only LRs change.
        assert torch.equal(noisy["hr"], half["hr"]) and torch.equal(noisy["hr"], clean["hr"])
        expected = torch.stack([torch.from_numpy(degrade_bicubic(hr.numpy(), 2)) for hr in clean["hr"]])
        assert torch.equal(clean["lr"], expected)
        replaced = [not torch.equal(a, b) for a, b in zip(half["lr"], noisy["lr"], strict=True)]
        assert 8 <= sum(replaced) <= 24  # about half of 32
        for i, was_replaced in enumerate(replaced):
            assert torch.equal(half["lr"][i], expected[i] if was_replaced else noisy["lr"][i])
        assert torch.equal(batch(0.5, step)["lr"], half["lr"])  # a pure function of (seed, step)
    with pytest.raises(ValueError, match="clean_fraction"):
        TrainConfig(model="espcn", scale=2, clean_fraction=1.5)


def test_networks_train_channels_last(pairs_root: Path, tmp_path: Path) -> None:
    from medsr.training.trainer import _Run  # the run's own networks: the layout is internal to training

    run = _Run(config(pairs_root, tmp_path / "layout", model="srgan", steps=2, warmup_steps=1))
    convs = [m.weight for net in (run.generator, run.discriminator) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
