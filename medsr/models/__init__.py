"""Super-resolution architectures, one file each, looked up by name.

Every generator takes ``(N, 1, h, w)`` float32 in [0, 1] (the array contract of
:mod:`medsr.data`) and returns ``(N, 1, h*scale, w*scale)``; it is fully convolutional (any
``h, w``, odd included), exposes ``generator.scale``, predicts a residual over bicubic
upsampling, and clamps to [0, 1] in eval mode only (see :mod:`medsr.models.blocks`).
Discriminators return ``(N, 1)`` logits for any patch size; a conditional one
(``ModelSpec.conditional_discriminator``) is called as ``d(hr_or_sr, lr)``, the others as
``d(hr_or_sr)``. Nothing here picks a device: move models with ``.to(device)``.

    >>> g = build_generator("espcn", 4)
    >>> count_parameters(g)
    61840
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from medsr.models.bicubic import Bicubic
from medsr.models.blimsr import BliMSRDiscriminator, BliMSRGenerator
from medsr.models.blocks import SUPPORTED_SCALES, SRGenerator, bicubic_upsample, check_scale
from medsr.models.brainsr import BrainSRDiscriminator, BrainSRGenerator, curriculum_stage
from medsr.models.espcn import ESPCN
from medsr.models.residual_cnn import ResidualCNN
from medsr.models.srgan import SRGANDiscriminator, SRResNet
from medsr.models.swift_srgan import SwiftSRGANDiscriminator, SwiftSRGANGenerator

TrainingPairs = Literal["standard", "blind", "ssl"]


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model besides its layers.

    ``training_pairs``: which pair set it trains on: ``"standard"`` (fixed blur, bicubic,
    noise), ``"blind"`` (random second-order degradation) or ``"ssl"`` (VLR -> LR,
    self-supervised). ``conditional_discriminator``: the discriminator also sees the LR input,
    ``d(hr_or_sr, lr)``. ``seed``: file name in ``shared/seeds/`` that the model comes from
    (empty for the bicubic baseline, which every seed uses but none describes).
    """

    name: str
    adversarial: bool
    conditional_discriminator: bool
    training_pairs: TrainingPairs
    scales: tuple[int, ...]
    seed: str
    description: str


MODEL_NAMES: tuple[str, ...] = ("espcn", "srgan", "swift_srgan", "brainsr", "blimsr", "residual_cnn", "bicubic")

_SPECS: dict[str, ModelSpec] = {
    "espcn": ModelSpec("espcn", False, False, "standard", SUPPORTED_SCALES, "espcn-brain-mri.md",
                       "ESPCN: four LR-space convs and one sub-pixel shuffle (Shi et al. 2016); 62k parameters."),
    "srgan": ModelSpec("srgan", True, False, "standard", SUPPORTED_SCALES, "swift-srgan-chest-xray.md",
                       "SRGAN: SRResNet generator (16 BN residual blocks) and VGG-style discriminator "
                       "(Ledig et al. 2017)."),
    "swift_srgan": ModelSpec("swift_srgan", True, False, "standard", SUPPORTED_SCALES, "swift-srgan-chest-xray.md",
                             "Swift-SRGAN: SRGAN with depthwise-separable convolutions, ~0.2M-parameter "
                             "generator (Krishnan & Krishnan 2021)."),
    "brainsr": ModelSpec("brainsr", True, True, "standard", SUPPORTED_SCALES, "brainsr-cgan-brain-mri.md",
                         "BrainSR: residual cGAN for brain MRI SR and denoising; discriminator conditioned on "
                         "the LR input; curriculum from x2/mild to target/strong."),
    "blimsr": ModelSpec("blimsr", True, False, "blind", SUPPORTED_SCALES, "blimsr-blind-degradation-ct.md",
                        "BliMSR: multi-head-attention residual generator (~19M) and spectral-norm "
                        "discriminator, trained on blind degradations (Dey et al. 2023)."),
    "residual_cnn": ModelSpec("residual_cnn", False, False, "ssl", SUPPORTED_SCALES, "light-residual-cnn-ct.md",
                              "Light residual CNN: bicubic plus a five-layer ReLU CNN residual, trained "
                              "self-supervised VLR->LR and applied LR->HR."),
    "bicubic": ModelSpec("bicubic", False, False, "standard", SUPPORTED_SCALES, "",
                         "Bicubic interpolation baseline (no parameters, nothing to train)."),
}

_GENERATORS: dict[str, Callable[..., SRGenerator]] = {
    "espcn": ESPCN,
    "srgan": SRResNet,
    "swift_srgan": SwiftSRGANGenerator,
    "brainsr": BrainSRGenerator,
    "blimsr": BliMSRGenerator,
    "residual_cnn": ResidualCNN,
    "bicubic": Bicubic,
}

_DISCRIMINATORS: dict[str, Callable[..., nn.Module] | None] = {
    "espcn": None,
    "srgan": SRGANDiscriminator,
    "swift_srgan": SwiftSRGANDiscriminator,
    "brainsr": BrainSRDiscriminator,
    "blimsr": BliMSRDiscriminator,
    "residual_cnn": None,
    "bicubic": None,
}


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ValueError listing the valid names if unknown."""
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _SPECS[name]


def build_generator(name: str, scale: int, **options: Any) -> nn.Module:
    """A freshly initialised generator. ``options`` go to its constructor (e.g. BliMSR's
    ``n_groups``, ``n_blocks``, ``n_feats``); unknown options raise TypeError."""
    spec = model_spec(name)
    return _GENERATORS[name](check_scale(scale, spec.scales), **options)


def build_discriminator(name: str, **options: Any) -> nn.Module | None:
    """A freshly initialised discriminator, or None for a model that is not adversarial."""
    model_spec(name)
    factory = _DISCRIMINATORS[name]
    return None if factory is None else factory(**options)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not); spectral-norm power-iteration vectors are
    buffers and do not count."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "MODEL_NAMES", "ModelSpec", "SRGenerator", "bicubic_upsample", "build_discriminator", "build_generator",
    "count_parameters", "curriculum_stage", "model_spec",
]
