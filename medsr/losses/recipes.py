"""Recipes: a generator's loss as config, built into a list of terms.

A recipe is a mapping from term keys (:data:`TERMS`) to that term's constructor arguments
(``weight``, ``reduction`` and its own options); a key present switches the term on (BasicSR's
``pixel_opt``/``perceptual_opt``). The order of the keys is the order the weighted terms are
summed in, kept from the published recipes so that training on the same seeds gives the same
numbers. :data:`RECIPES` names the published combinations:

* ``pixel``: L1 only, for ESPCN and the residual CNN (and every GAN's pixel warm-up);
* ``srgan`` (SRGAN / Swift-SRGAN): MSE + 0.006 feature + 1e-3 adversarial + 2e-8 TV;
* ``blimsr``: feature + 0.01 adversarial + 0.1 L1 + gradient + DSSIM (the BliMSR ensemble);
* ``cgan`` (BrainSR conditional GAN): L1 + 0.1 feature + 1e-3 adversarial.

A model names its recipe where it registers (``register_architecture(loss_recipe=...)``);
params.yaml may pick another (``train.models.<name>.loss.recipe``) and change any term's
arguments or add a term (``loss.terms.<key>: {...}``), e.g. ``{pixel: {kind: log_mse}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from medsr.losses.adversarial import AdversarialLoss
from medsr.losses.base import LossTerm
from medsr.losses.feature import FeatureLoss
from medsr.losses.pixel import GradientLoss, PixelLoss, TotalVariationLoss
from medsr.losses.ssim import DSSIMLoss

TERMS: dict[str, type[LossTerm]] = {cls.key: cls for cls in (
    PixelLoss, FeatureLoss, AdversarialLoss, TotalVariationLoss, GradientLoss, DSSIMLoss)}

RecipeConfig = Mapping[str, Mapping[str, Any]]

RECIPES: dict[str, RecipeConfig] = {
    "pixel": {"pixel": {"kind": "l1", "weight": 1.0}},
    # Ledig et al. / Krishnan et al. (Swift-SRGAN): image MSE + 0.006 perception + 1e-3 adversarial + 2e-8 TV.
    "srgan": {"pixel": {"kind": "mse", "weight": 1.0}, "feature": {"weight": 0.006, "criterion": "mse"},
              "adversarial": {"weight": 1e-3}, "tv": {"weight": 2e-8}},
    # Dey et al. (BliMSR) ensemble loss.
    "blimsr": {"feature": {"weight": 1.0}, "adversarial": {"weight": 0.01}, "pixel": {"kind": "l1", "weight": 0.1},
               "gradient": {"weight": 1.0}, "dssim": {"weight": 1.0}},
    "cgan": {"pixel": {"kind": "l1", "weight": 1.0}, "feature": {"weight": 0.1}, "adversarial": {"weight": 1e-3}},
}


def recipe_config(name: str, terms: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Recipe ``name`` of :data:`RECIPES` with ``terms`` merged in: each key's arguments update the
    recipe's (a new key is appended, so it is summed last).

    Raises ValueError for an unknown recipe or term key, listing the valid ones.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown loss recipe {name!r}; known: {', '.join(RECIPES)}")
    merged = {key: dict(arguments) for key, arguments in RECIPES[name].items()}
    for key, arguments in (terms or {}).items():
        merged[key] = {**merged.get(key, {}), **dict(arguments or {})}
    return merged


def build_terms(config: RecipeConfig, *, feature_weights: str | Path | None = None) -> list[LossTerm]:
    """One term per key of ``config``, in order, each built as ``TERMS[key](**config[key])``.

    ``feature_weights`` (``train.feature_weights``) goes to the ``feature`` term unless the config
    names its own ``weights_path``. Raises ValueError for an unknown key (listing :data:`TERMS`)
    and whatever the term's constructor raises for a bad argument (ValueError naming the term; an
    unknown argument: TypeError re-raised as ValueError naming the term).
    """
    terms: list[LossTerm] = []
    for key, arguments in config.items():
        if key not in TERMS:
            raise ValueError(f"unknown loss term {key!r}; known: {', '.join(TERMS)}")
        options = dict(arguments)
        if key == FeatureLoss.key and feature_weights is not None:
            options.setdefault("weights_path", feature_weights)
        try:
            terms.append(TERMS[key](**options))
        except TypeError as err:
            raise ValueError(f"loss term {key!r}: {err}") from None
    return terms


class GeneratorLoss(nn.Module):
    """The generator objective: the sum of each term's ``weight * value``, in the recipe's order.

    Args:
        terms: built by :func:`build_terms`; at most one of each key.
        name: the recipe's name, for the run's record.

    Calling it returns ``(total, {log_name: unweighted value})``; terms of weight 0 are skipped.
    ``warmup=True`` gives the pixel term alone, unweighted, as SRGAN pre-trains SRResNet (a
    recipe without a pixel term raises ValueError when asked for a warm-up).
    """

    def __init__(self, terms: Sequence[LossTerm], name: str = "custom") -> None:
        super().__init__()
        keys = [term.key for term in terms]
        if len(set(keys)) != len(keys):
            raise ValueError(f"loss recipe {name!r} repeats a term: {keys}")
        self.terms = nn.ModuleList(terms)
        self.name = name

    @classmethod
    def from_config(cls, config: RecipeConfig, *, name: str = "custom",
                    feature_weights: str | Path | None = None) -> GeneratorLoss:
        """Build from a recipe config (see :func:`recipe_config` and :func:`build_terms`)."""
        return cls(build_terms(config, feature_weights=feature_weights), name=name)

    def term(self, key: str) -> LossTerm | None:
        """The term of ``key``, or None when the recipe has none."""
        return next((t for t in self.terms if isinstance(t, LossTerm) and t.key == key), None)

    def _weighted(self, key: str) -> LossTerm | None:
        term = self.term(key)
        return term if term is not None and term.weight > 0.0 else None

    @property
    def adversarial(self) -> bool:
        """True when an adversarial term with a positive weight is in the recipe."""
        return self._weighted(AdversarialLoss.key) is not None

    @property
    def relativistic(self) -> bool:
        """Whether the adversarial term (and so the discriminator's loss) is relativistic."""
        term = self.term(AdversarialLoss.key)
        return isinstance(term, AdversarialLoss) and term.relativistic

    @property
    def needs_discriminator_features(self) -> bool:
        """True when a weighted feature term matches discriminator features (no VGG file)."""
        term = self._weighted(FeatureLoss.key)
        return isinstance(term, FeatureLoss) and not term.perceptual

    @property
    def feature_loss_note(self) -> str:
        """What the feature term computes, or ``"not used"``."""
        term = self._weighted(FeatureLoss.key)
        return term.note if isinstance(term, FeatureLoss) else "not used"

    def forward(self, sr: Tensor, hr: Tensor, *, fake_logits: Tensor | None = None,
                real_logits: Tensor | None = None, fake_features: Sequence[Tensor] | None = None,
                real_features: Sequence[Tensor] | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        if warmup:
            pixel = self.term(PixelLoss.key)
            if pixel is None:
                raise ValueError(f"loss recipe {self.name!r} has no pixel term for the warm-up")
            value = pixel(sr, hr)
            return value, {pixel.log_name: value}
        values: dict[str, Tensor] = {}
        total = sr.new_zeros(())
        for term in self.terms:
            assert isinstance(term, LossTerm)
            if term.weight == 0.0:
                continue
            value = term(sr, hr, fake_logits=fake_logits, real_logits=real_logits, fake_features=fake_features,
                         real_features=real_features)
            values[term.log_name] = value
            total = total + term.weight * value
        return total, values
