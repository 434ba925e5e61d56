"""One training loop for every MedSR generator, plain or adversarial.

* Data: random patches of ``train/x<scale>/<kind>`` pairs (kind from the model spec:
  standard, blind or ssl) through a DataLoader; BrainSR follows its curriculum (x2 pairs first,
  then the target scale; standard pairs mixed with blind ones as the degradation strength
  grows). Validation is always PSNR/SSIM on whole images of ``val/x<scale>/standard`` at the
  target scale (the residual CNN too: trained VLR->LR on ssl pairs, judged LR->HR).
* Adversarial models first train the generator alone on the pixel loss for ``warmup_steps``
  (SRGAN's SRResNet pre-training), then alternate a discriminator step and a generator step.
  The validation at the end of the warm-up is a candidate for ``best.pt`` like any other, so
  a short adversarial phase can never make the chosen model worse than its warm start.
* Device: ``auto`` uses CUDA with float16 autocast and GradScaler when available, else CPU
  float32.
* Safety: every loss term is checked each step; a NaN/inf stops the run naming the model, step
  and term, before the optimiser step, so no checkpoint ever holds a NaN model. Checkpoints are
  written atomically; ``last.pt`` resumes a killed run to the same final step.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from medsr.data.pairs import PairSet
from medsr.losses import (
    RECIPES,
    GeneratorLoss,
    build_feature_loss,
    discriminator_adversarial_loss,
    forward_with_features,
    recipe_for_model,
)
from medsr.metrics import evaluate_pairs
from medsr.models import build_discriminator, build_generator, model_spec
from medsr.training.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    architecture_fingerprint,
    assert_finite_parameters,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from medsr.training.config import TrainConfig
from medsr.training.data import Curriculum, PatchBatches, pair_set_path


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stops before the weights are touched."""


@dataclass
class TrainResult:
    """Outcome of :func:`train_generator`."""

    best_checkpoint: Path | None  # None only when no validation has run yet (paused early)
    last_checkpoint: Path
    steps_done: int
    best_val_psnr: float
    best_step: int | None
    history: list[dict[str, Any]]
    resumed_from_step: int | None  # None for a fresh run
    stopped_early: bool
    finished: bool  # reached config.steps or stopped early (False: paused by max_steps_this_run)
    feature_loss_used: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    return device


def _forward(generator: nn.Module, lr: Tensor, scale: int | None) -> Tensor:
    # Only multi-scale generators (BrainSR) take a scale argument; None means the target scale.
    return generator(lr) if scale is None else generator(lr, scale=scale)


def predict_image(generator: nn.Module, lr: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Super-resolve one contract image ``(1, h, w)`` -> ``(1, H, W)`` float32 clamped to [0, 1].

    The whole image goes through the network at once, in eval mode and float32.
    """
    if lr.ndim != 3 or lr.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, h, w), got {lr.shape}")
    if device is None:
        first = next(generator.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = generator.training
    generator.eval()
    try:
        with torch.inference_mode():
            x = torch.from_numpy(np.array(lr, dtype=np.float32, copy=True))[None].to(device)
            sr = generator(x).float().clamp_(0.0, 1.0)
    finally:
        generator.train(was_training)
    return sr[0].cpu().numpy()


def _curriculum_for(model: str) -> Curriculum | None:
    if model == "brainsr":
        from medsr.models.brainsr import curriculum_stage

        return curriculum_stage
    return None


def _set_requires_grad(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


class _Run:
    """State of one call to :func:`train_generator` (split out to keep the loop readable)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.spec = model_spec(config.model)
        self.device = resolve_device(config.device)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.out_dir = Path(config.out_dir)
        self.last_path = self.out_dir / LAST_NAME
        self.best_path = self.out_dir / BEST_NAME

        torch.manual_seed(config.seed)
        self.generator = build_generator(config.model, config.scale, **config.model_options).to(self.device)
        if not any(p.requires_grad for p in self.generator.parameters()):
            raise ValueError(f"model {config.model!r} has no trainable parameters; there is nothing to train")
        self.discriminator = None
        if self.spec.adversarial:
            self.discriminator = build_discriminator(config.model, **config.discriminator_options)
            if self.discriminator is None:
                raise ValueError(f"model {config.model!r} is adversarial but has no discriminator")
            self.discriminator = self.discriminator.to(self.device)
        self.fingerprint = architecture_fingerprint(config.model, config.scale, self.generator)

        loss_options = config.loss
        recipe_name = loss_options.get("recipe") or recipe_for_model(
            config.model, adversarial=self.spec.adversarial,
            conditional_discriminator=self.spec.conditional_discriminator)
        if recipe_name not in RECIPES:
            raise ValueError(f"train.loss.recipe {recipe_name!r} is unknown; known: {sorted(RECIPES)}")
        recipe = RECIPES[recipe_name].with_overrides(pixel=loss_options.get("pixel"),
                                                     weights=loss_options.get("weights"),
                                                     adversarial_weight=config.adv_weight)
        if recipe.adversarial and self.discriminator is None:
            raise ValueError(f"loss recipe {recipe_name!r} is adversarial but model {config.model!r} "
                             "has no discriminator")
        # Perceptual weights are only loaded when a feature term will actually be computed.
        uses_features = recipe.weights.get("feature", 0.0) > 0.0
        perceptual = (build_feature_loss(config.feature_weights, criterion=recipe.perceptual_criterion)
                      if uses_features else None)
        relativistic = loss_options.get("adversarial") == "relativistic"
        self.loss = GeneratorLoss(recipe, perceptual, relativistic=relativistic).to(self.device)
        self.adversarial = self.discriminator is not None and recipe.adversarial

        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr_generator, betas=(0.9, 0.999))
        self.opt_d = (torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_discriminator, betas=(0.9, 0.999))
                      if self.adversarial else None)
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)

        self.curriculum = _curriculum_for(config.model)
        self.multi_scale = self.curriculum is not None
        self.val_pairs = PairSet(pair_set_path(config.pairs_root, "val", config.scale, "standard"))
        if self.val_pairs.scale != config.scale:
            raise ValueError(f"{self.val_pairs.folder}: scale {self.val_pairs.scale} is not the target x{config.scale}")
        count = len(self.val_pairs)
        if count == 0:
            raise ValueError(f"{self.val_pairs.folder}: validation set is empty")
        limit = config.val_max_images
        # Evenly spaced, fixed subset: every modality stays represented and scores stay comparable.
        self.val_indices = (None if limit is None or limit >= count
                            else sorted({int(i) for i in np.linspace(0, count - 1, limit)}))

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_val_psnr = -math.inf
        self.best_step: int | None = None
        self.bad_validations = 0
        self.stopped_early = False
        self.resumed_from: int | None = None
        self.sums: dict[str, float] = {}
        self.sum_count = 0
        self.last_scale = config.scale
        self.interval_start = time.monotonic()

    # ---------------------------------------------------------------- checkpoints
    def _metadata(self) -> dict[str, Any]:
        c = self.config
        return {"model": c.model, "scale": c.scale, "model_options": dict(c.model_options),
                "fingerprint": self.fingerprint, "step": self.step, "best_val_psnr": self.best_val_psnr,
                "best_step": self.best_step, "profile": c.profile, "feature_loss": self.loss.feature_loss_note}

    def save_last(self) -> None:
        assert_finite_parameters(self.generator, f"{self.config.model} generator at step {self.step}")
        save_checkpoint(self.last_path, {
            **self._metadata(),
            "kind": "last",
            "total_steps": self.config.steps,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizer_g": self.opt_g.state_dict(),
            "optimizer_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "bad_validations": self.bad_validations,
            "stopped_early": self.stopped_early,
            # Running loss sums since the last validation, so a pause between validations does
            # not change the logged averages.
            "loss_sums": dict(self.sums),
            "loss_count": self.sum_count,
            "config": self.config.to_dict(),
        })

    def save_best(self, val: dict[str, Any]) -> None:
        assert_finite_parameters(self.generator, f"{self.config.model} generator at step {self.step}")
        save_checkpoint(self.best_path, {**self._metadata(), "kind": "best", "generator": self.generator.state_dict(),
                                         "val": val})

    def resume(self) -> None:
        payload = load_checkpoint(self.last_path)
        c = self.config
        check_compatible(payload, self.last_path, model=c.model, scale=c.scale, options=dict(c.model_options),
                         fingerprint=self.fingerprint)
        if int(payload["step"]) > c.steps:
            raise ValueError(f"checkpoint {self.last_path} is at step {payload['step']}, beyond steps={c.steps}; "
                             "raise train.steps or use another out_dir")
        if (payload["discriminator"] is None) != (self.discriminator is None):
            raise ValueError(f"checkpoint {self.last_path}: discriminator presence differs from this run's model")
        self.generator.load_state_dict(payload["generator"])
        self.opt_g.load_state_dict(payload["optimizer_g"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(payload["discriminator"])
            if self.opt_d is not None and payload["optimizer_d"] is not None:
                self.opt_d.load_state_dict(payload["optimizer_d"])
        for scaler, key in ((self.scaler_g, "scaler_g"), (self.scaler_d, "scaler_d")):
            # A CPU run saves a disabled (empty) scaler; a CUDA resume then starts a fresh one.
            if scaler.is_enabled() and payload.get(key):
                scaler.load_state_dict(payload[key])
        restore_rng_state(payload["rng"])
        self.step = int(payload["step"])
        self.history = list(payload["history"])
        self.best_val_psnr = float(payload["best_val_psnr"])
        self.best_step = payload["best_step"]
        self.bad_validations = int(payload["bad_validations"])
        self.stopped_early = bool(payload["stopped_early"])
        self.sums = {k: float(v) for k, v in payload["loss_sums"].items()}
        self.sum_count = int(payload["loss_count"])
        self.resumed_from = self.step

    # ---------------------------------------------------------------- steps
    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp)

    def _check_finite(self, terms: dict[str, Tensor]) -> dict[str, float]:
        values = dict(zip(terms, torch.stack([t.detach().float() for t in terms.values()]).tolist(), strict=True))
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.config.model} x{self.config.scale}: loss term '{name}' is {value} at step {self.step}; "
                    f"training stopped before the update (last checkpoint: "
                    f"{self.last_path if self.last_path.exists() else 'none'})")
        return values

    def _apply(self, loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               module: nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.config.grad_clip is not None and self.config.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    def _discriminate(self, image: Tensor, lr: Tensor, *, with_features: bool) -> tuple[Tensor, list[Tensor]]:
        inputs = (image, lr) if self.spec.conditional_discriminator else (image,)
        if with_features:
            return forward_with_features(self.discriminator, *inputs)
        return self.discriminator(*inputs), []

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        lr = batch["lr"].to(self.device, non_blocking=True)
        hr = batch["hr"].to(self.device, non_blocking=True)
        scale = int(batch["scale"]) if self.multi_scale else None
        warmup = self.step <= self.config.warmup_steps
        logged: dict[str, float] = {}
        if not self.adversarial or warmup:
            with self._autocast():
                sr = _forward(self.generator, lr, scale)
                total, terms = self.loss(sr, hr, warmup=warmup)
            logged.update(self._check_finite(terms))
            self._apply(total, self.opt_g, self.scaler_g, self.generator)
            return logged

        # Discriminator step on a detached SR batch, then a generator step through the updated D.
        _set_requires_grad(self.discriminator, True)
        with self._autocast():
            sr = _forward(self.generator, lr, scale)
            real_logits, _ = self._discriminate(hr, lr, with_features=False)
            fake_logits, _ = self._discriminate(sr.detach(), lr, with_features=False)
            loss_d = discriminator_adversarial_loss(real_logits, fake_logits, relativistic=self.loss.relativistic)
        logged.update(self._check_finite({"d_adversarial": loss_d}))
        self._apply(loss_d, self.opt_d, self.scaler_d, self.discriminator)

        _set_requires_grad(self.discriminator, False)  # gradients reach SR through D, not D's weights
        features = self.loss.needs_discriminator_features
        with self._autocast():
            fake_logits, fake_features = self._discriminate(sr, lr, with_features=features)
            with torch.no_grad():
                real_logits, real_features = self._discriminate(hr, lr, with_features=features)
            total, terms = self.loss(sr, hr, fake_logits=fake_logits, real_logits=real_logits,
                                     fake_features=fake_features or None, real_features=real_features or None)
        logged.update(self._check_finite({**terms, "total": total}))
        self._apply(total, self.opt_g, self.scaler_g, self.generator)
        _set_requires_grad(self.discriminator, True)
        return logged

    # ---------------------------------------------------------------- validation
    def validate(self) -> dict[str, Any]:
        was_training = self.generator.training
        self.generator.eval()
        try:
            val = evaluate_pairs(lambda lr: predict_image(self.generator, lr, self.device), self.val_pairs,
                                 indices=self.val_indices)
        finally:
            self.generator.train(was_training)
        if not math.isfinite(val["psnr"]):
            raise NonFiniteLossError(f"{self.config.model} x{self.config.scale}: validation PSNR is {val['psnr']} at "
                                     f"step {self.step}")
        if not self.adversarial:
            phase = "pixel"
        else:
            phase = "warmup" if self.step <= self.config.warmup_steps else "adversarial"
        entry = {
            "step": self.step,
            "phase": phase,
            "scale": self.last_scale,
            "losses": {k: v / max(self.sum_count, 1) for k, v in sorted(self.sums.items())},
            "val_psnr": val["psnr"],
            "val_ssim": val["ssim"],
            "val_per_modality": val["per_modality"],
            "seconds": time.monotonic() - self.interval_start,
        }
        self.sums, self.sum_count, self.interval_start = {}, 0, time.monotonic()
        if val["psnr"] > self.best_val_psnr:
            self.best_val_psnr, self.best_step, self.bad_validations = val["psnr"], self.step, 0
            self.save_best(val)
        else:
            self.bad_validations += 1
        entry["best_val_psnr"] = self.best_val_psnr
        self.history.append(entry)
        return entry


def train_generator(config: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                    max_steps_this_run: int | None = None) -> TrainResult:
    """Train (or resume training) one generator as configured; see the module docstring.

    ``on_epoch`` is called with each validation's history entry (after its checkpoints are
    written), e.g. to log to MLflow. ``max_steps_this_run`` pauses the run after that many
    steps with a checkpoint (a later call resumes it).
    """
    run = _Run(config)
    if config.resume and run.last_path.exists():
        run.resume()
    else:
        # A fresh run must not inherit another run's best model, nor be resumed from its state.
        run.best_path.unlink(missing_ok=True)
        run.last_path.unlink(missing_ok=True)
    start = run.step
    stop = config.steps if max_steps_this_run is None else min(config.steps, start + max_steps_this_run)
    done = run.stopped_early or start >= config.steps

    if not done and stop > start:
        dataset = PatchBatches(config.pairs_root, kind=run.spec.training_pairs, target_scale=config.scale,
                               batch_size=config.batch_size, lr_patch=config.lr_patch, seed=config.seed,
                               first_step=start + 1, last_step=stop, total_steps=config.steps,
                               augment=config.augment, curriculum=run.curriculum,
                               blind_fraction=config.blind_fraction)
        loader = DataLoader(dataset, batch_size=None, num_workers=config.num_workers,
                            pin_memory=run.device.type == "cuda")
        progress = tqdm(total=config.steps, initial=start, desc=f"{config.model} x{config.scale}", unit="step",
                        disable=config.quiet or not sys.stderr.isatty(), leave=False)
        run.generator.train()
        if run.discriminator is not None:
            run.discriminator.train()
        try:
            for batch in loader:
                run.step += 1
                if batch["step"] != run.step:  # the loader must deliver steps in order
                    raise RuntimeError(f"data loader delivered step {batch['step']} for step {run.step}")
                run.last_scale = int(batch["scale"])
                for name, value in run.train_step(batch).items():
                    run.sums[name] = run.sums.get(name, 0.0) + value
                run.sum_count += 1
                progress.update(1)
                final = run.step == config.steps
                end_of_warmup = run.adversarial and run.step == config.warmup_steps
                entry = None
                if final or end_of_warmup or run.step % config.val_every == 0:
                    entry = run.validate()
                    progress.set_postfix(val_psnr=f"{entry['val_psnr']:.2f}")
                    if end_of_warmup:
                        run.bad_validations = 0  # the adversarial phase gets its own patience window
                    patience = config.early_stopping_patience
                    if patience is not None and run.bad_validations >= patience and not final:
                        run.stopped_early = True
                if final or run.stopped_early or run.step == stop or run.step % config.checkpoint_every == 0:
                    run.save_last()
                if entry is not None and on_epoch is not None:
                    on_epoch(entry)
                if run.stopped_early or run.step == stop:
                    break
        finally:
            progress.close()
    if not run.last_path.exists():
        run.save_last()

    return TrainResult(
        best_checkpoint=run.best_path if run.best_path.exists() else None,
        last_checkpoint=run.last_path,
        steps_done=run.step,
        best_val_psnr=run.best_val_psnr,
        best_step=run.best_step,
        history=run.history,
        resumed_from_step=run.resumed_from,
        stopped_early=run.stopped_early,
        finished=run.stopped_early or run.step >= config.steps,
        feature_loss_used=run.loss.feature_loss_note if run.adversarial else "not used (pixel loss only)",
        device=str(run.device),
        extra={"recipe": run.loss.recipe.name, "amp": run.use_amp, "val_images": len(run.val_indices)
               if run.val_indices is not None else len(run.val_pairs)},
    )
