"""Training configuration: one dataclass, built from ``params.yaml``.

Expected layout of the ``train`` section (every key optional; defaults are the dataclass'). Where
the pairs are read and the checkpoints written is not a setting: ``dvc.yaml`` fixes both
(``data/pairs``, ``models/<model>``), and every stage reads the same constants
(:data:`medsr.stage_entry.PAIRS_DIR`, :data:`~medsr.stage_entry.MODELS_DIR`). Code that trains
outside the pipeline (tests, notebooks) passes ``pairs_root``/``out_dir``, or ``pairs_root`` and
``out_root`` inside a params dict, to :meth:`TrainConfig.from_params`.

.. code-block:: yaml

    seed: 1234                 # top level, shared with the other stages
    train:
      profile: smoke           # which entry of ``profiles`` to apply
      feature_weights: null    # VGG19 state_dict file; null -> feature matching
      device: auto
      num_workers: 2
      nproc: 1               # data-parallel ranks through torchrun (medsr.training.launch)
      concurrent_scales: auto  # scales of one model trained at once, one process each (CPU)
      profiles:
        smoke: {steps: 200, batch_size: 8, lr_patch: 24, val_every: 50, checkpoint_every: 50}
        full:  {steps: 20000, batch_size: 16, lr_patch: 48, val_every: 1000, checkpoint_every: 1000}
      models:                  # the models DVC trains (dvc.yaml foreach) and their settings
        espcn: {}
        srgan: {warmup_steps: 100, model_options: {n_blocks: 8}, discriminator_options: {},
                loss: {recipe: srgan, terms: {adversarial: {relativistic: true}, tv: {weight: 0}}}}

Precedence: dataclass defaults < ``train`` top-level keys < ``profiles[profile]`` <
``models[model]`` < ``models[model].x<scale>`` < ``profiles[profile].models[model]`` (a profile's
budget for one model) < ``profiles[profile].models[model].x<scale>``; a ``x<scale>`` entry holds
settings for that scale alone (e.g. ``residual_cnn: {x2: {training_pairs: standard}}``); nested
dicts (``loss``, ``model_options``, ``discriminator_options``) are merged key by key, and
``loss.terms`` term by term. Unknown keys raise, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medsr.stage_entry import MODELS_DIR, PAIRS_DIR

_NESTED = ("loss", "model_options", "discriminator_options")
# loss.recipe: a name in medsr.losses.RECIPES (default: the model's own); loss.terms: {term key:
# its constructor arguments}, merged over the recipe's (medsr.losses.recipes.recipe_config).
LOSS_KEYS = frozenset({"recipe", "terms"})


def _is_scale_key(key: Any) -> bool:
    """``x2``, ``x4``...: a model entry's per-scale settings."""
    return isinstance(key, str) and len(key) > 1 and key[0] == "x" and key[1:].isdigit()


@dataclass
class TrainConfig:
    """Everything one training run needs; plain values only (it is stored in checkpoints)."""

    model: str
    scale: int
    pairs_root: str = str(PAIRS_DIR)
    out_dir: str = ""  # default: models/<model>/x<scale>
    profile: str = "default"
    steps: int = 1000  # total generator optimisation steps, warm-up included
    batch_size: int = 16
    lr_patch: int = 32  # side of the LR training patch in pixels
    lr_generator: float = 1e-4
    lr_discriminator: float = 1e-4
    # The generator's base rate in the adversarial phase; None: lr_generator. SRGAN trains its GAN
    # phase at 1e-4 whatever the pre-training used; a fast pixel warm-up rate there destabilises it.
    lr_generator_adversarial: float | None = None
    warmup_steps: int = 0  # GAN models: pixel-loss-only steps before the adversarial phase
    adv_weight: float | None = None  # None: the loss recipe's own weight
    loss: dict[str, Any] = field(default_factory=dict)  # recipe, terms (see LOSS_KEYS)
    # Learning-rate schedule of both networks, applied per phase (the pixel warm-up and the
    # adversarial phase each run their own course, as SRGAN's 1e-4 -> 1e-5 GAN phase does):
    # constant; step (x lr_gamma at each fraction of the phase in lr_milestones); cosine (from
    # 1 down to lr_gamma over the phase).
    lr_schedule: str = "constant"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5])
    lr_gamma: float = 0.1
    # Exponential moving average of the generator weights (Real-ESRGAN: 0.999); None disables.
    # With EMA the averaged weights are validated and kept, and the raw weights are scored beside them.
    ema_decay: float | None = None
    checkpoint_every: int = 100
    val_every: int = 100
    val_max_images: int | None = None  # per validation track; None: the whole set
    early_stopping_patience: int | None = None  # validations that do not improve their phase's criterion
    grad_clip: float | None = 1.0  # max global gradient norm; None disables
    num_workers: int = 0
    seed: int = 1234
    device: str = "auto"  # "auto" (CUDA with AMP when available), "cpu", "cuda", "cuda:N"
    amp: bool = True  # mixed precision on CUDA; never on CPU
    augment: bool = True  # random flips and 90-degree rotations of training patches
    blind_fraction: float = 1.0  # blind-trained models: share of blind pairs, the rest standard
    # Share of training patches whose LR is replaced by the clean degradation of their HR patch
    # (antialiased bicubic alone, the clean track's operator): a clean-heavier mix than the pair
    # set's own degrade.train_range.clean_fraction, for one model without re-degrading everyone's pairs.
    clean_fraction: float = 0.0
    # The pair set trained on (standard, blind or ssl); None: the model's own (ModelSpec.training_pairs).
    training_pairs: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    discriminator_options: dict[str, Any] = field(default_factory=dict)
    feature_weights: str | None = None  # VGG19 weights file for the perceptual loss
    # The published checkpoint to start from ({file, url, sha256, licence, source}; medsr.pretrained),
    # fetched into pretrained/ by the `pretrained` stage; None: a fresh initialisation.
    init: dict[str, Any] | None = None
    # Data-parallel ranks (torchrun, medsr.training.launch); the global batch stays batch_size,
    # each rank trains on batch_size / nproc of it. Not part of what a run computes: see stage.config_digest.
    nproc: int = 1
    # How many scales of one model train at once, each in its own process on cores // n torch threads
    # (medsr.training.stage.scale_concurrency): auto is one process per scale on the CPU when the cores
    # allow, one at a time on a GPU or with nproc > 1. Not part of the digest either (a run resumes
    # under any value); the thread count it implies changes the float rounding, so each MLflow run
    # records it (tag torch_threads).
    concurrent_scales: int | str = "auto"
    resume: bool = True  # continue from out_dir/last.pt when it exists
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if not self.out_dir:
            self.out_dir = f"{MODELS_DIR}/{self.model}/x{self.scale}"
        if self.feature_weights is not None and not str(self.feature_weights).strip():
            self.feature_weights = None
        positive = ("steps", "batch_size", "lr_patch", "checkpoint_every", "val_every", "scale", "nproc")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.nproc:
            raise ValueError(f"train.batch_size ({self.batch_size}) must divide by train.nproc ({self.nproc}): "
                             "every rank trains on an equal shard of the global batch")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"train.warmup_steps must be in 0..steps ({self.steps}), got {self.warmup_steps}")
        if self.concurrent_scales != "auto" and (not isinstance(self.concurrent_scales, int)
                                                  or isinstance(self.concurrent_scales, bool) or self.concurrent_scales < 1):
            raise ValueError(f"train.concurrent_scales must be auto or a positive integer, got {self.concurrent_scales!r}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"train.early_stopping_patience must be >= 1 or null, got {self.early_stopping_patience}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.lr_schedule not in ("constant", "step", "cosine"):
            raise ValueError(f"train.lr_schedule must be constant, step or cosine, got {self.lr_schedule!r}")
        self.lr_milestones = [float(m) for m in self.lr_milestones]
        if any(not 0.0 < m < 1.0 for m in self.lr_milestones) or self.lr_milestones != sorted(self.lr_milestones):
            raise ValueError(f"train.lr_milestones must be increasing fractions of a phase in (0, 1), "
                             f"got {self.lr_milestones}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"train.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.training_pairs is not None:
            from medsr.models.architectures import TRAINING_PAIRS  # the models' own list of pair sets

            if self.training_pairs not in TRAINING_PAIRS:
                raise ValueError(f"train.training_pairs must be {', '.join(TRAINING_PAIRS)} or null, "
                                 f"got {self.training_pairs!r}")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError(f"train.clean_fraction must be in [0, 1], got {self.clean_fraction}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        unknown = set(self.loss) - LOSS_KEYS
        if unknown:
            raise ValueError(f"train.loss: unknown keys {sorted(unknown)}; known: {sorted(LOSS_KEYS)}")
        if not isinstance(self.loss.get("terms", {}), dict):
            raise ValueError(f"train.loss.terms must map term names to their arguments, got {self.loss['terms']!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_params(cls, params: dict[str, Any], model: str, scale: int, *, profile: str | None = None,
                    **overrides: Any) -> TrainConfig:
        """Resolve the config of ``model`` at ``scale`` from a loaded ``params.yaml`` (layout above)."""
        train = dict(params.get("train") or {})
        profiles = train.pop("profiles", None) or {}
        models = train.pop("models", None) or {}
        out_root = train.pop("out_root", str(MODELS_DIR))
        chosen = profile or train.pop("profile", None) or "default"
        train.pop("profile", None)
        if chosen not in profiles and chosen != "default":
            raise ValueError(f"train.profile {chosen!r} is not defined; profiles: {sorted(profiles)}")
        values: dict[str, Any] = {"seed": params.get("seed", 1234)}
        profile_layer = dict(profiles.get(chosen) or {})
        # A profile may size one model differently (a CPU budget for the heavy GANs): most specific wins.
        profile_models = profile_layer.pop("models", None) or {}
        layers = [train, profile_layer]
        for model_layer in (models.get(model) or {}, profile_models.get(model) or {}):
            # A model's entry may hold one scale's own settings under "x<scale>" (the most specific).
            own = {k: v for k, v in model_layer.items() if not _is_scale_key(k)}
            layers += [own, model_layer.get(f"x{int(scale)}") or {}]
        for layer in (*layers, overrides):
            for key, value in layer.items():
                if key in _NESTED and isinstance(value, dict):
                    merged = {**values.get(key, {}), **value}
                    if key == "loss" and isinstance(value.get("terms"), dict):  # a layer changes one term's arguments
                        earlier = values.get(key, {}).get("terms") or {}
                        merged["terms"] = {t: {**(earlier.get(t) or {}), **(value["terms"][t] or {})}
                                           for t in {**earlier, **value["terms"]}}
                    values[key] = merged
                else:
                    values[key] = value
        values.update(model=model, scale=int(scale), profile=chosen)
        values.setdefault("out_dir", f"{out_root}/{model}/x{int(scale)}")
        return cls.from_dict(values)
