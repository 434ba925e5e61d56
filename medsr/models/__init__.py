"""Super-resolution architectures, one file each, looked up by name in one registry.

Every generator takes ``(N, 1, h, w)`` float32 in [0, 1] (the array contract of
:mod:`medsr.data`) and returns ``(N, 1, h*scale, w*scale)``; it is fully convolutional (any
``h, w``, odd included), exposes ``generator.scale``, predicts a residual over bicubic
upsampling, and clamps to [0, 1] in eval mode only (see :mod:`medsr.models.blocks`).
Discriminators return ``(N, 1)`` logits for any patch size; a conditional one
(``ModelSpec.conditional_discriminator``) is called as ``d(hr_or_sr, lr)``, the others as
``d(hr_or_sr)``. Nothing here picks a device: move models with ``.to(device)``.

Adding a model is one file: a module in this package whose generator class is decorated with
:func:`~medsr.models.architectures.register_architecture`. Every module of the package is
imported below, so the decorator runs and the name appears in :func:`model_names`, and from
there in the training stage, the benchmark, the CLI's choices and serving.

    >>> g = build_generator("espcn", 4)
    >>> count_parameters(g)
    61840
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from medsr.models.architectures import ARCHITECTURES, ModelSpec, TrainingPairs, register_architecture
from medsr.models.blocks import SRGenerator
from medsr.models.gated import NoiseGated
from medsr.scale import check_scale

# Import every module of the package: each model's file registers it (the decorator runs at import).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from medsr.models.brainsr import curriculum_stage  # noqa: E402  (re-exported; imported by the loop above)


def model_names(*, trained: bool | None = None) -> tuple[str, ...]:
    """Every registered model name, sorted; ``trained=True`` drops the untrained baseline(s)
    (bicubic), ``trained=False`` keeps only them."""
    return ARCHITECTURES.names(trained=trained)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``. Raises ValueError naming the registry and the valid names."""
    return ARCHITECTURES.get(name)


def build_generator(name: str, scale: int, **options: Any) -> nn.Module:
    """A freshly initialised generator of model ``name`` at ``scale`` (one of the spec's scales).

    ``options`` go to its constructor (e.g. BliMSR's ``n_groups``, ``n_blocks``, ``n_feats``), except
    ``noise_gate`` (``{threshold, exponent, tuned_share}``), which builds the pair of two such
    generators that :mod:`medsr.models.gated` describes (for a model started from published weights).
    Raises ValueError for an unknown name, unsupported scale or bad gate, TypeError for an unknown option.
    """
    spec = model_spec(name)
    scale = check_scale(scale, spec.scales)
    gate = options.pop("noise_gate", None)
    if gate is not None:
        return NoiseGated.from_options(lambda: spec.generator(scale, **options), gate)
    return spec.generator(scale, **options)


def build_discriminator(name: str, **options: Any) -> nn.Module | None:
    """A freshly initialised discriminator of model ``name``, or None for a model that is not
    adversarial. ``options`` go to its constructor; an unknown one raises TypeError."""
    spec = model_spec(name)
    return None if spec.discriminator is None else spec.discriminator(**options)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not); spectral-norm power-iteration vectors are
    buffers and do not count."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "ARCHITECTURES", "ModelSpec", "NoiseGated", "SRGenerator", "TrainingPairs", "build_discriminator",
    "build_generator", "check_scale", "count_parameters", "curriculum_stage", "model_names", "model_spec",
    "register_architecture",
]
