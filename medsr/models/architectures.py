"""The architecture registry: each generator registers itself where its class is defined.

Why a decorator on the class (BasicSR's ``@ARCH_REGISTRY.register()``): a model's file is the
one place that knows its layers, its discriminator, the pairs it trains on and the paper it comes
from, so that is where it says so. :mod:`medsr.models` imports every module of the package, so a
new file under ``medsr/models/`` is registered with no other edit, and every list of models
(training, benchmark, CLI choices, serving) is read from this registry (or, for what DVC trains,
from the one list ``train.models`` in params.yaml).

The registry is a name -> :class:`ModelSpec` lookup and nothing else: it refuses a second
registration under a taken name (a copy-pasted file would otherwise silently replace a model),
and its errors name the registry and list the valid names.

    >>> @register_architecture("toy", description="two convs", training_pairs="standard")
    ... class Toy(SRGenerator): ...                                    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from medsr.scale import SUPPORTED_SCALES, check_scale

TrainingPairs = Literal["standard", "blind", "ssl"]
TRAINING_PAIRS: tuple[str, ...] = ("standard", "blind", "ssl")

GeneratorClass = TypeVar("GeneratorClass", bound=type[nn.Module])
# progress in [0, 1], target scale -> {"scale": int, "degradation_strength": float}
Curriculum = Callable[[float, int], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model besides its layers.

    ``generator``: the class called as ``generator(scale, **model_options)``. ``discriminator``:
    the class called as ``discriminator(**discriminator_options)``, or None for a model trained on
    a pixel loss alone (the model is then not ``adversarial``). ``conditional_discriminator``: the
    discriminator also sees the LR input, ``d(hr_or_sr, lr)``. ``training_pairs``: which pair set
    it trains on: ``"standard"`` (fixed blur, bicubic, noise), ``"blind"`` (random second-order
    degradation) or ``"ssl"`` (VLR -> LR, self-supervised). ``scales``: the upscaling factors it
    is built for. ``loss_recipe``: the name of its generator loss recipe in
    :data:`medsr.losses.RECIPES`. ``trained``: False for a baseline with nothing to learn (bicubic),
    which the training stage refuses and the benchmark scores anyway. ``curriculum``: a function
    ``(progress in [0, 1], target_scale) -> {"scale", "degradation_strength"}`` for a model that
    trains on a curriculum (BrainSR), else None. ``seed``: file name in ``shared/seeds/`` that the
    model comes from (empty for the bicubic baseline, which every seed uses but none describes).
    """

    name: str
    generator: type[nn.Module]
    discriminator: type[nn.Module] | None
    conditional_discriminator: bool
    training_pairs: TrainingPairs
    scales: tuple[int, ...]
    seed: str
    description: str
    loss_recipe: str
    trained: bool = True
    curriculum: Curriculum | None = None

    @property
    def adversarial(self) -> bool:
        """True when the model trains against a discriminator."""
        return self.discriminator is not None

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"{where}: a model name must be a lower-case Python identifier (it names a file "
                             "and a DVC stage)")
        if self.training_pairs not in TRAINING_PAIRS:
            raise ValueError(f"{where}: training_pairs must be one of {', '.join(TRAINING_PAIRS)}, "
                             f"got {self.training_pairs!r}")
        if self.conditional_discriminator and self.discriminator is None:
            raise ValueError(f"{where}: conditional_discriminator needs a discriminator")
        if not self.scales:
            raise ValueError(f"{where}: scales must name at least one supported scale")
        for scale in self.scales:
            check_scale(scale)
        if not self.description.strip():
            raise ValueError(f"{where}: a description is required (it is shown in the model card)")


class ArchitectureRegistry:
    """Name -> :class:`ModelSpec`; ``name`` appears in every error. Names are listed sorted, so
    that no list depends on the order in which the package's modules happened to be imported."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._specs: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec) -> ModelSpec:
        """Register ``spec``. Raises ValueError if its name is taken (naming both classes)."""
        taken = self._specs.get(spec.name)
        if taken is not None:
            raise ValueError(f"{self.name} registry: {spec.name!r} is already registered by "
                             f"{taken.generator.__module__}.{taken.generator.__qualname__}; "
                             f"{spec.generator.__module__}.{spec.generator.__qualname__} needs another name")
        self._specs[spec.name] = spec
        return spec

    def remove(self, name: str) -> ModelSpec:
        """Unregister ``name`` and return its spec (tests that register a toy model clean up)."""
        self.get(name)
        return self._specs.pop(name)

    def get(self, name: str) -> ModelSpec:
        """The spec registered as ``name``. Raises ValueError listing the valid names if unknown."""
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"unknown model {name!r} in the {self.name} registry; "
                             f"valid names: {', '.join(self._specs) or '(none registered)'}")
        return spec

    def names(self, *, trained: bool | None = None) -> tuple[str, ...]:
        """Registered names, sorted; ``trained`` True/False keeps only those that are (or are not)
        trained, None keeps all."""
        return tuple(sorted(n for n, s in self._specs.items() if trained is None or s.trained == trained))

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter([self._specs[name] for name in self.names()])


ARCHITECTURES = ArchitectureRegistry("architecture")


def register_architecture(name: str, *, description: str, seed: str = "",
                          discriminator: type[nn.Module] | None = None, conditional_discriminator: bool = False,
                          training_pairs: TrainingPairs = "standard", scales: tuple[int, ...] = SUPPORTED_SCALES,
                          loss_recipe: str | None = None, trained: bool = True,
                          curriculum: Curriculum | None = None) -> Callable[[GeneratorClass], GeneratorClass]:
    """Class decorator: register the decorated generator class as ``name`` in :data:`ARCHITECTURES`.

    The arguments are the :class:`ModelSpec` fields (see there). ``loss_recipe`` defaults to
    ``"pixel"`` for a model without a discriminator and ``"srgan"`` for one with. Raises
    ValueError for a taken name or an invalid field, at import time of the model's module.
    """
    recipe = loss_recipe or ("srgan" if discriminator is not None else "pixel")

    def register(cls: GeneratorClass) -> GeneratorClass:
        ARCHITECTURES.add(ModelSpec(name=name, generator=cls, discriminator=discriminator,
                                    conditional_discriminator=conditional_discriminator,
                                    training_pairs=training_pairs, scales=tuple(scales), seed=seed,
                                    description=description, loss_recipe=recipe, trained=trained,
                                    curriculum=curriculum))
        return cls

    return register
