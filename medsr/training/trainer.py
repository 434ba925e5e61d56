"""One training loop for every MedSR generator, plain or adversarial.

* Data: random patches of the training tiles (``train/hr``), degraded as they are drawn into
  pairs of the model spec's kind (standard, blind or ssl), through a DataLoader
  (:mod:`medsr.training.data`); BrainSR follows its curriculum (x2 pairs first,
  then the target scale; standard pairs mixed with blind ones as the degradation strength
  grows). Validation scores whole images of both evaluation tracks at the target scale,
  ``val/x<scale>/clean`` and ``val/x<scale>/realistic`` (``val/.../standard`` alone for a pair
  root written before the tracks existed): PSNR, SSIM and the perceptual score MS-GMSD
  (:mod:`medsr.perceptual`) per track, against bicubic's scores computed once per run. The
  residual CNN too is judged LR->HR although it trains VLR->LR on ssl pairs.
* Adversarial models first train the generator alone on the pixel loss for ``warmup_steps``
  (SRGAN's SRResNet pre-training), then alternate a discriminator step and a generator step.
  The discriminator scores real and fake in one forward pass (one set of BatchNorm statistics).
* Kept checkpoints (phase-aware, :data:`KEPT`): a plain model keeps ``best.pt``, the best mean
  PSNR gain over bicubic across the tracks. A GAN keeps ``warmup.pt`` (the same criterion over
  its pixel phase) and ``adversarial.pt`` (the lowest MS-GMSD among adversarial validations
  whose clean-track PSNR is above bicubic's: a perceptual choice under a fidelity floor);
  ``best.pt``, the one the pipeline ships, is the adversarial one when any qualifies, else the
  warm-up one. Each records its ``phase`` and ``step``.
* Schedule and EMA: ``lr_schedule`` (constant, step or cosine) drives both optimisers, per
  phase, from ``lr_generator`` (``lr_generator_adversarial`` in the GAN phase when set) and
  ``lr_discriminator``; ``ema_decay`` keeps an exponential moving average of the generator, which is then
  what is validated and kept, with the raw weights scored beside it.
* Device: ``auto`` uses CUDA with float16 autocast and GradScaler when available, else CPU
  float32.
* Data-parallel (``torchrun``, :mod:`medsr.training.dist`): each rank trains on its shard
  of every batch, both networks are wrapped in ``DistributedDataParallel`` (gradients averaged
  over the ranks; BatchNorm synchronised on CUDA only, per-rank statistics on CPU), logged losses
  are averaged over the ranks, and rank 0 alone validates and writes checkpoints; the others
  follow its early-stopping decision.
* Safety: every loss term is checked each step; a NaN/inf stops the run naming the model, step
  and term, before the optimiser step, so no checkpoint ever holds a NaN model. Checkpoints are
  written atomically; ``last.pt`` resumes a killed run to the same final step.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from medsr.data.pairs import PairSet
from medsr.inference import Upscaler, pick_device
from medsr.losses import GeneratorLoss, discriminate_jointly, discriminator_adversarial_loss, recipe_config
from medsr.metrics import score_image
from medsr.models import NoiseGated, build_discriminator, build_generator, model_spec
from medsr.perceptual import PERCEPTUAL_METRIC, ms_gmsd
from medsr.training.checkpoint import (
    ADVERSARIAL_NAME,
    BEST_NAME,
    LAST_NAME,
    WARMUP_NAME,
    architecture_fingerprint,
    assert_finite_parameters,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from medsr.training import dist
from medsr.training.config import TrainConfig
from medsr.training.data import FIDELITY_TRACK, PatchBatches, validation_tracks

PHASE_PIXEL = "pixel"  # a plain model's only phase
PHASE_WARMUP = "warmup"  # a GAN's pixel-loss pre-training
PHASE_ADVERSARIAL = "adversarial"
# Kept checkpoint -> file name. "best" is the shipped one; the others exist for GANs only.
KEPT: dict[str, str] = {"best": BEST_NAME, "warmup": WARMUP_NAME, "adversarial": ADVERSARIAL_NAME}


#: Layout of the networks' weights while they train (the ``_Run`` comment says why).
TRAINING_MEMORY_FORMAT = torch.channels_last


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stops before the weights are touched."""


@dataclass
class TrainResult:
    """Outcome of :func:`train_generator`."""

    best_checkpoint: Path | None  # None only when no validation has run yet (paused early)
    last_checkpoint: Path
    steps_done: int
    best_val_psnr: float  # best.pt's mean validation PSNR over the tracks
    best_step: int | None
    history: list[dict[str, Any]]
    resumed_from_step: int | None  # None for a fresh run
    stopped_early: bool
    finished: bool  # reached config.steps or stopped early (False: paused by max_steps_this_run)
    feature_loss_used: str
    device: str
    # Kept checkpoint name ("best", "warmup", "adversarial") -> {"file", "phase", "step", scores...}
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    bicubic_val: dict[str, dict[str, float]] = field(default_factory=dict)  # track -> bicubic's scores
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_phase(self) -> str | None:
        return self.checkpoints.get("best", {}).get("phase")


def lr_factor(step: int, config: TrainConfig, *, adversarial: bool) -> float:
    """Multiplier of the base learning rates for optimisation step ``step`` (1-based).

    The schedule runs over the phase the step belongs to: a GAN's warm-up and its adversarial
    phase each start at the full rate (SRGAN: 1e-4 for the first half of the GAN phase, 1e-5
    after); a plain model has one phase, the whole run.
    """
    if config.lr_schedule == "constant":
        return 1.0
    if adversarial and 0 < config.warmup_steps < config.steps and step > config.warmup_steps:
        start, length = config.warmup_steps, config.steps - config.warmup_steps
    elif adversarial and config.warmup_steps > 0:
        start, length = 0, config.warmup_steps
    else:
        start, length = 0, config.steps
    progress = (step - 1 - start) / max(length, 1)  # 0 at the phase's first step, < 1 at its last
    if config.lr_schedule == "step":
        return float(config.lr_gamma ** sum(progress >= m for m in config.lr_milestones))
    return config.lr_gamma + (1.0 - config.lr_gamma) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter (Real-ESRGAN's EMA);
    buffers (BatchNorm running statistics) are copied, since averaging them has no meaning."""
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)


def score_track(predict: Callable[[np.ndarray], np.ndarray], pairs: PairSet,
                indices: Sequence[int] | None = None) -> dict[str, Any]:
    """PSNR, SSIM and MS-GMSD of ``predict`` on whole images of one pair set, overall and per
    modality: the means of :func:`medsr.metrics.score_image`, the scores every report averages, plus MS-GMSD
    (the adversarial checkpoints' criterion)."""
    border = pairs.scale
    per_modality: dict[str, list[tuple[float, float, float]]] = {}
    for i in (range(len(pairs)) if indices is None else indices):
        hr = pairs.hr(i)
        sr = np.asarray(predict(pairs.lr(i)))
        if sr.shape != hr.shape:
            raise ValueError(f"pair {pairs.pairs[i]['id']}: prediction {sr.shape} does not match HR {hr.shape}")
        # Training validation reads psnr and ssim only: no foreground mask (Otsu, hole filling) per image.
        image = score_image(sr, hr, scale=border, modality=pairs.pairs[i]["modality"], foreground=False)
        scores = (image["psnr"], image["ssim"], ms_gmsd(sr, hr, border=border))
        per_modality.setdefault(pairs.pairs[i]["modality"], []).append(scores)
    if not per_modality:
        raise ValueError(f"{pairs.folder}: no pairs to evaluate")

    def summary(values: list[tuple[float, float, float]]) -> dict[str, Any]:
        array = np.asarray(values, dtype=np.float64)
        return {"count": len(values), "psnr": float(array[:, 0].mean()), "ssim": float(array[:, 1].mean()),
                PERCEPTUAL_METRIC: float(array[:, 2].mean())}

    overall = summary([v for values in per_modality.values() for v in values])
    overall["per_modality"] = {m: summary(v) for m, v in sorted(per_modality.items())}
    return overall


def _forward(generator: nn.Module, lr: Tensor, scale: int | None) -> Tensor:
    # Only multi-scale generators (BrainSR) take a scale argument; None means the target scale.
    return generator(lr) if scale is None else generator(lr, scale=scale)


def _set_requires_grad(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for parameter in module.parameters():
            parameter.requires_grad_(flag)


class _Run:
    """State of one call to :func:`train_generator` (split out to keep the loop readable)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.spec = model_spec(config.model)
        self.ctx = dist.context()
        if config.batch_size % self.ctx.world_size:
            raise ValueError(f"train.batch_size ({config.batch_size}) must divide by the {self.ctx.world_size} ranks: "
                             "every rank trains on an equal shard of the global batch")
        self.device = pick_device(config.device)
        if self.device.type == "cuda" and self.ctx.distributed:
            self.device = torch.device("cuda", self.ctx.local_rank)  # one GPU per local rank
        self.use_amp = config.amp and self.device.type == "cuda"
        self.out_dir = Path(config.out_dir)
        self.last_path = self.out_dir / LAST_NAME
        self.best_path = self.out_dir / BEST_NAME

        torch.manual_seed(config.seed)
        self.generator = build_generator(config.model, config.scale, **config.model_options).to(self.device)
        if config.init is not None:  # published weights (medsr.pretrained), before a resume overwrites them
            from medsr.pretrained import initial_state

            start = initial_state(config.model, config.scale, config.init)
            if isinstance(self.generator, NoiseGated):  # both branches start there; the published one stays
                self.generator.load_start(start)
            else:
                self.generator.load_state_dict(start, strict=True)
        elif isinstance(self.generator, NoiseGated):
            raise ValueError(f"model {config.model!r} x{config.scale}: model_options.noise_gate gates a fine-tune "
                             "against the weights it started from; name those weights in train.models."
                             f"{config.model}.init")
        if not any(p.requires_grad for p in self.generator.parameters()):
            raise ValueError(f"model {config.model!r} has no trainable parameters; there is nothing to train")
        # Channels-last weights make every convolution run oneDNN's NHWC kernels. The NCHW kernel for
        # SRResNet's 9x9 16->1 tail at HR ran at ~1 GFLOP/s (90 ms of a 173 ms x4 step on 2 cores);
        # NHWC halved the SRGAN, Swift-SRGAN and BrainSR steps and is no slower elsewhere (docs/history.md).
        self.generator = self.generator.to(memory_format=TRAINING_MEMORY_FORMAT)
        self.discriminator = None
        if self.spec.adversarial:
            self.discriminator = build_discriminator(config.model, **config.discriminator_options)
            if self.discriminator is None:
                raise ValueError(f"model {config.model!r} is adversarial but has no discriminator")
            self.discriminator = self.discriminator.to(self.device, memory_format=TRAINING_MEMORY_FORMAT)
        self.fingerprint = architecture_fingerprint(config.model, config.scale, self.generator)
        # The averaged copy is never trained: eval mode, no gradients.
        self.ema = (copy.deepcopy(self.generator).eval().requires_grad_(False)
                    if config.ema_decay is not None else None)

        # The model's own recipe unless params pick another; params' term arguments merged over it.
        recipe_name = config.loss.get("recipe") or self.spec.loss_recipe
        overrides = {key: dict(arguments or {}) for key, arguments in (config.loss.get("terms") or {}).items()}
        if config.adv_weight is not None:
            overrides.setdefault("adversarial", {})["weight"] = config.adv_weight
        # The feature term loads its VGG weights file (if any) only when its weight is positive.
        self.loss = GeneratorLoss.from_config(recipe_config(recipe_name, overrides), name=recipe_name,
                                              feature_weights=config.feature_weights).to(self.device)
        if self.loss.adversarial and self.discriminator is None:
            raise ValueError(f"loss recipe {recipe_name!r} is adversarial but model {config.model!r} "
                             "has no discriminator")
        self.adversarial = self.discriminator is not None and self.loss.adversarial

        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr_generator, betas=(0.9, 0.999))
        self.opt_d = (torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_discriminator, betas=(0.9, 0.999))
                      if self.adversarial else None)
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)

        # What the training step calls: the networks themselves, or their DDP wrappers (wrap()).
        self.g_train: nn.Module = self.generator
        self.d_train: nn.Module | None = self.discriminator

        self.curriculum = self.spec.curriculum
        self.multi_scale = self.curriculum is not None
        self.val_sets: dict[str, PairSet] = {}
        self.val_indices: dict[str, list[int] | None] = {}
        for track, folder in validation_tracks(config.pairs_root, config.scale).items():
            pairs = PairSet(folder)
            if pairs.scale != config.scale:
                raise ValueError(f"{pairs.folder}: scale {pairs.scale} is not the target x{config.scale}")
            count = len(pairs)
            if count == 0:
                raise ValueError(f"{pairs.folder}: validation set is empty")
            limit = config.val_max_images
            # Evenly spaced, fixed subset: every modality stays represented and scores stay comparable.
            self.val_sets[track] = pairs
            self.val_indices[track] = (None if limit is None or limit >= count
                                       else sorted({int(i) for i in np.linspace(0, count - 1, limit)}))
        self.fidelity_track = FIDELITY_TRACK if FIDELITY_TRACK in self.val_sets else next(iter(self.val_sets))
        self.bicubic_val: dict[str, dict[str, Any]] = {}  # filled once per run, at the first validation

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.kept: dict[str, dict[str, Any]] = {}  # kept checkpoint name -> its record
        self.bad_validations = 0
        self.stopped_early = False
        self.resumed_from: int | None = None
        self.sums: dict[str, float] = {}
        self.sum_count = 0
        self.last_scale = config.scale
        self.interval_start = time.monotonic()

    # ---------------------------------------------------------------- checkpoints
    @property
    def best_record(self) -> dict[str, Any]:
        return self.kept.get("best", {})

    def _metadata(self) -> dict[str, Any]:
        c = self.config
        best = self.best_record
        return {"model": c.model, "scale": c.scale, "model_options": dict(c.model_options),
                "fingerprint": self.fingerprint, "step": self.step,
                "best_val_psnr": best.get("val_psnr", -math.inf), "best_step": best.get("step"),
                "profile": c.profile, "feature_loss": self.loss.feature_loss_note}

    def save_last(self) -> None:
        assert_finite_parameters(self.generator, f"{self.config.model} generator at step {self.step}")
        save_checkpoint(self.last_path, {
            **self._metadata(),
            "kind": "last",
            "phase": self.phase_of(self.step),
            "total_steps": self.config.steps,
            "generator": self.generator.state_dict(),
            "generator_ema": self.ema.state_dict() if self.ema is not None else None,
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizer_g": self.opt_g.state_dict(),
            "optimizer_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "kept": self.kept,
            "bad_validations": self.bad_validations,
            "stopped_early": self.stopped_early,
            # Running loss sums since the last validation, so a pause between validations does
            # not change the logged averages.
            "loss_sums": dict(self.sums),
            "loss_count": self.sum_count,
            "config": self.config.to_dict(),
        })

    def keep(self, name: str, entry: dict[str, Any], *, rule: str) -> None:
        """Write the validated weights as kept checkpoint ``name`` and remember its record."""
        weights = self.ema if self.ema is not None else self.generator
        assert_finite_parameters(weights, f"{self.config.model} generator at step {self.step}")
        record = {"file": KEPT[name], "phase": entry["phase"], "step": entry["step"], "rule": rule,
                  "weights": "ema" if self.ema is not None else "raw",
                  **{k: entry[k] for k in ("val_psnr", "val_ssim", PERCEPTUAL_METRIC, "val_gain_db",
                                           "above_fidelity_floor")},
                  "val_psnr_per_track": {t: v["psnr"] for t, v in entry["val"].items()}}
        self.kept[name] = record
        save_checkpoint(self.out_dir / KEPT[name], {
            **self._metadata(), "kind": name, "phase": entry["phase"], "step": entry["step"],
            "best_val_psnr": entry["val_psnr"], "best_step": entry["step"], "selection": record,
            "generator": weights.state_dict(), "val": entry["val"], "bicubic_val": self.bicubic_val})

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
        if self.ema is not None:
            # A run that enables EMA on resume starts its average from the current weights.
            self.ema.load_state_dict(payload.get("generator_ema") or payload["generator"])
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
        self.kept = dict(payload.get("kept") or {})
        self.bad_validations = int(payload["bad_validations"])
        self.stopped_early = bool(payload["stopped_early"])
        self.sums = {k: float(v) for k, v in payload["loss_sums"].items()}
        self.sum_count = int(payload["loss_count"])
        self.resumed_from = self.step

    def wrap(self) -> None:
        """Wrap both networks in DDP when this is one rank of several (after any resume: DDP
        broadcasts rank 0's weights and buffers at construction)."""
        if not self.ctx.distributed:
            return
        cuda = self.device.type == "cuda"
        if cuda:
            # Batch statistics over the global batch. CPU ranks cannot: torch's SyncBatchNorm
            # refuses CPU tensors, so they normalise with their own shard's statistics.
            # The converted modules keep the same Parameter and buffer objects (the optimisers
            # and the EMA still point at them) and the same state-dict keys.
            nn.SyncBatchNorm.convert_sync_batchnorm(self.generator)
            if self.discriminator is not None:
                nn.SyncBatchNorm.convert_sync_batchnorm(self.discriminator)
        ids = [self.device.index] if cuda else None
        # A multi-scale generator leaves the other scale's head out of each step.
        self.g_train = DistributedDataParallel(self.generator, device_ids=ids, find_unused_parameters=self.multi_scale)
        if self.discriminator is not None and self.adversarial:
            self.d_train = DistributedDataParallel(self.discriminator, device_ids=ids)

    # ---------------------------------------------------------------- steps
    def phase_of(self, step: int) -> str:
        if not self.adversarial:
            return PHASE_PIXEL
        return PHASE_WARMUP if step <= self.config.warmup_steps else PHASE_ADVERSARIAL

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp)

    def _check_finite(self, terms: dict[str, Tensor]) -> dict[str, float]:
        # Mean over the ranks: each rank's terms are means over its equal shard, so this is the term
        # over the global batch, and a NaN on any rank stops every rank at the same step.
        stacked = dist.average(torch.stack([t.detach().float() for t in terms.values()]))
        values = dict(zip(terms, stacked.tolist(), strict=True))
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

    def _set_learning_rates(self) -> None:
        factor = lr_factor(self.step, self.config, adversarial=self.adversarial)
        generator_base = self.config.lr_generator
        if self.phase_of(self.step) == PHASE_ADVERSARIAL and self.config.lr_generator_adversarial is not None:
            generator_base = self.config.lr_generator_adversarial
        for optimizer, base in ((self.opt_g, generator_base), (self.opt_d, self.config.lr_discriminator)):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = base * factor

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        lr = batch["lr"].to(self.device, non_blocking=True)
        hr = batch["hr"].to(self.device, non_blocking=True)
        scale = int(batch["scale"]) if self.multi_scale else None
        warmup = self.phase_of(self.step) != PHASE_ADVERSARIAL
        self._set_learning_rates()
        logged: dict[str, float] = {}
        if warmup:
            with self._autocast():
                sr = _forward(self.g_train, lr, scale)
                total, terms = self.loss(sr, hr, warmup=self.adversarial)  # a GAN's warm-up: pixel term alone
            logged.update(self._check_finite(terms))
            self._apply(total, self.opt_g, self.scaler_g, self.generator)
            self._update_ema()
            return logged

        # Discriminator step on a detached SR batch, then a generator step through the updated D.
        # Real and fake go through D together, in both steps (see discriminate_jointly).
        condition = (lr,) if self.spec.conditional_discriminator else ()
        _set_requires_grad(self.discriminator, True)
        with self._autocast():
            sr = _forward(self.g_train, lr, scale)
            real_logits, fake_logits, _, _ = discriminate_jointly(self.d_train, hr, sr.detach(), *condition)
            loss_d = discriminator_adversarial_loss(real_logits, fake_logits, relativistic=self.loss.relativistic)
        logged.update(self._check_finite({"d_adversarial": loss_d}))
        self._apply(loss_d, self.opt_d, self.scaler_d, self.discriminator)

        _set_requires_grad(self.discriminator, False)  # gradients reach SR through D, not D's weights
        # The bare D, not its DDP wrapper: D's weights get no gradient in this step, and a DDP
        # forward would wait for gradients to all-reduce that never come.
        with self._autocast():
            real_logits, fake_logits, real_features, fake_features = discriminate_jointly(
                self.discriminator, hr, sr, *condition, with_features=self.loss.needs_discriminator_features)
            total, terms = self.loss(sr, hr, fake_logits=fake_logits, real_logits=real_logits,
                                     fake_features=fake_features or None, real_features=real_features or None)
        logged.update(self._check_finite({**terms, "total": total}))
        self._apply(total, self.opt_g, self.scaler_g, self.generator)
        _set_requires_grad(self.discriminator, True)
        self._update_ema()
        return logged

    def _update_ema(self) -> None:
        if self.ema is not None and self.config.ema_decay is not None:
            ema_update(self.ema, self.generator, self.config.ema_decay)

    # ---------------------------------------------------------------- validation
    def _score(self, generator: nn.Module) -> dict[str, dict[str, Any]]:
        was_training = generator.training
        generator.eval()
        try:
            # The network alone, whole images: the selection criterion stays the raw network's.
            upscaler = Upscaler(generator, self.config.scale, device=self.device)
            return {track: score_track(upscaler.network, pairs, self.val_indices[track])
                    for track, pairs in self.val_sets.items()}
        finally:
            generator.train(was_training)

    def _summary(self, val: dict[str, dict[str, Any]]) -> dict[str, Any]:
        tracks = list(val)
        return {
            "val_psnr": float(np.mean([val[t]["psnr"] for t in tracks])),
            "val_ssim": float(np.mean([val[t]["ssim"] for t in tracks])),
            PERCEPTUAL_METRIC: float(np.mean([val[t][PERCEPTUAL_METRIC] for t in tracks])),
            "val_gain_db": float(np.mean([val[t]["psnr"] - self.bicubic_val[t]["psnr"] for t in tracks])),
            # The fidelity floor: an adversarial checkpoint must still beat bicubic on clean inputs.
            "above_fidelity_floor": bool(val[self.fidelity_track]["psnr"]
                                         > self.bicubic_val[self.fidelity_track]["psnr"]),
        }

    def validate(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.interval_start  # the training interval alone
        if not self.bicubic_val:
            bicubic = build_generator("bicubic", self.config.scale).to(self.device)
            self.bicubic_val = {t: {k: v for k, v in scores.items() if k != "per_modality"}
                                for t, scores in self._score(bicubic).items()}
        val = self._score(self.ema if self.ema is not None else self.generator)
        summary = self._summary(val)
        if not math.isfinite(summary["val_psnr"]):
            raise NonFiniteLossError(f"{self.config.model} x{self.config.scale}: validation PSNR is "
                                     f"{summary['val_psnr']} at step {self.step}")
        entry: dict[str, Any] = {
            "step": self.step,
            "phase": self.phase_of(self.step),
            "scale": self.last_scale,
            "losses": {k: v / max(self.sum_count, 1) for k, v in sorted(self.sums.items())},
            "val": {t: {k: v for k, v in scores.items()} for t, scores in val.items()},
            **summary,
            "bicubic_val": self.bicubic_val,
            "val_per_modality": val[self.fidelity_track]["per_modality"],
            "seconds": seconds,
            "validation_seconds": 0.0,
        }
        if self.ema is not None:  # the raw weights, measured against the average
            raw = self._summary(self._score(self.generator))
            entry["raw"] = raw
        entry["kept"] = self._select(entry)
        entry["validation_seconds"] = time.monotonic() - self.interval_start - seconds
        self.sums, self.sum_count, self.interval_start = {}, 0, time.monotonic()
        self.bad_validations = 0 if entry["kept"] else self.bad_validations + 1
        entry["best_val_psnr"] = self.best_record.get("val_psnr", -math.inf)
        self.history.append(entry)
        return entry

    def _select(self, entry: dict[str, Any]) -> list[str]:
        """Update the kept checkpoints with this validation; returns the names it replaced."""
        kept: list[str] = []
        phase = entry["phase"]
        if phase in (PHASE_PIXEL, PHASE_WARMUP):
            name = "best" if phase == PHASE_PIXEL else "warmup"
            if entry["val_gain_db"] > self.kept.get(name, {}).get("val_gain_db", -math.inf):
                self.keep(name, entry, rule="best mean PSNR gain over bicubic across the tracks")
                kept.append(name)
            if phase == PHASE_WARMUP and name in kept and "adversarial" not in self.kept:
                self.keep("best", entry, rule="warm-up checkpoint: no adversarial checkpoint above the fidelity floor")
                kept.append("best")
            return kept
        previous = self.kept.get("adversarial", {}).get(PERCEPTUAL_METRIC, math.inf)
        if entry["above_fidelity_floor"] and entry[PERCEPTUAL_METRIC] < previous:
            self.keep("adversarial", entry, rule=f"lowest {PERCEPTUAL_METRIC} among adversarial validations "
                                                  f"above bicubic's {self.fidelity_track}-track PSNR")
            self.keep("best", entry, rule=self.kept["adversarial"]["rule"])
            kept += ["adversarial", "best"]
        elif "warmup" not in self.kept and "adversarial" not in self.kept and (
                entry["val_gain_db"] > self.best_record.get("val_gain_db", -math.inf)):
            # No warm-up phase (warmup_steps 0) and nothing above the floor yet: ship the most
            # faithful adversarial weights rather than nothing, and say so in the rule.
            self.keep("best", entry, rule="no warm-up and no adversarial checkpoint above the fidelity floor: "
                                          "best mean PSNR gain")
            kept.append("best")
        return kept


def train_generator(config: TrainConfig, *, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                    max_steps_this_run: int | None = None) -> TrainResult:
    """Train (or resume training) one generator as configured; see the module docstring.

    ``on_epoch`` is called with each validation's history entry (after its checkpoints are
    written), e.g. to log to MLflow. ``max_steps_this_run`` pauses the run after that many
    steps with a checkpoint (a later call resumes it).
    """
    run = _Run(config)
    main = run.ctx.is_main
    # Rank 0's view of the folder decides for every rank (it alone deletes; the others must not
    # see a file vanish between their check and their read).
    resuming = dist.broadcast_value(bool(config.resume and run.last_path.exists()))
    if resuming:
        run.resume()
    elif main:
        # A fresh run must not inherit another run's kept models, nor be resumed from its state.
        for name in (*KEPT.values(), LAST_NAME):
            (run.out_dir / name).unlink(missing_ok=True)
    dist.barrier()
    run.wrap()
    start = run.step
    stop = config.steps if max_steps_this_run is None else min(config.steps, start + max_steps_this_run)
    done = run.stopped_early or start >= config.steps

    if not done and stop > start:
        dataset = PatchBatches(config.pairs_root, kind=config.training_pairs or run.spec.training_pairs, target_scale=config.scale,
                               batch_size=config.batch_size, lr_patch=config.lr_patch, seed=config.seed,
                               first_step=start + 1, last_step=stop, total_steps=config.steps,
                               augment=config.augment, curriculum=run.curriculum,
                               blind_fraction=config.blind_fraction, clean_fraction=config.clean_fraction,
                               rank=run.ctx.rank,
                               world_size=run.ctx.world_size)
        # forkserver, not fork: a forked worker inherits every thread and handler of its parent (a
        # Prefect server's event loop, MLflow's and logging's background threads) and died with
        # exit code 1 once the suite had run a flow in-process; the dataset pickles cheaply.
        loader = DataLoader(dataset, batch_size=None, num_workers=config.num_workers,
                            pin_memory=run.device.type == "cuda",
                            multiprocessing_context="forkserver" if config.num_workers > 0 else None)
        progress = tqdm(total=config.steps, initial=start, desc=f"{config.model} x{config.scale}", unit="step",
                        disable=config.quiet or not main or not sys.stderr.isatty(), leave=False)
        run.generator.train()
        if run.discriminator is not None:
            run.discriminator.train()
        batches = iter(loader)
        try:
            for batch in batches:
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
                    if main:  # rank 0 validates alone; the others take its decision to stop
                        entry = run.validate()
                        progress.set_postfix(val_psnr=f"{entry['val_psnr']:.2f}")
                        if end_of_warmup:
                            run.bad_validations = 0  # the adversarial phase gets its own patience window
                        patience = config.early_stopping_patience
                        if patience is not None and run.bad_validations >= patience and not final:
                            run.stopped_early = True
                    run.stopped_early = dist.broadcast_value(run.stopped_early)
                if main and (final or run.stopped_early or run.step == stop or run.step % config.checkpoint_every == 0):
                    run.save_last()
                if entry is not None and on_epoch is not None:
                    on_epoch(entry)
                if run.stopped_early or run.step == stop:
                    break
        finally:
            progress.close()
            _close(batches)
    if main and not run.last_path.exists():
        run.save_last()
    dist.barrier()  # every rank returns with rank 0's checkpoints on disk

    best = run.best_record
    return TrainResult(
        best_checkpoint=run.best_path if run.best_path.exists() else None,
        last_checkpoint=run.last_path,
        steps_done=run.step,
        best_val_psnr=best.get("val_psnr", -math.inf),
        best_step=best.get("step"),
        history=run.history,
        resumed_from_step=run.resumed_from,
        stopped_early=run.stopped_early,
        finished=run.stopped_early or run.step >= config.steps,
        feature_loss_used=run.loss.feature_loss_note if run.adversarial else "not used (pixel loss only)",
        device=str(run.device),
        checkpoints={name: dict(record) for name, record in run.kept.items()},
        bicubic_val=run.bicubic_val,
        extra={"recipe": run.loss.name, "amp": run.use_amp, "perceptual_metric": PERCEPTUAL_METRIC,
               "fidelity_track": run.fidelity_track, "tracks": list(run.val_sets),
               "val_images": {t: len(i) if i is not None else len(run.val_sets[t]) for t, i in run.val_indices.items()},
               "ema_decay": config.ema_decay, "lr_schedule": config.lr_schedule},
    )


def _close(batches: Any) -> None:
    """Stop a DataLoader iterator's worker processes now, not whenever it is garbage collected.

    The loop leaves its iterator early (``break`` at the pause/stop step, early stopping, an
    exception). An exception's traceback holds this frame and so the iterator, for as long as a
    caller keeps the exception (``pytest.raises`` does, to the end of the test): its workers
    would live on until the interpreter exits, where multiprocessing kills them under the
    DataLoader's SIGCHLD handler instead of the iterator shutting them down. ``_shutdown_workers``
    is what the iterator's own ``__del__`` calls; it is idempotent.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # only the multi-process iterator has workers
    if shutdown is not None:
        shutdown()
