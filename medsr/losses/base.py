"""The one shape of a generator loss term: ``Term(weight=..., reduction=..., **term_options)``.

Why one base class: a recipe (:mod:`medsr.losses.recipes`) is then a list of terms built from
config keys, and the weighting happens in one place (:class:`~medsr.losses.recipes.GeneratorLoss`
adds ``weight * term(...)``), as BasicSR's ``loss_weight``/``reduction`` do. A term returns its
*unweighted* value, so the logged value of a term means the same whatever its weight.

``reduction`` says how a term's per-element (or per-image) values become one number: ``"mean"``
or ``"sum"``; each term documents what it averages over and declares the reductions it supports
(an SSIM map summed, or a relativistic GAN loss summed, would have no published meaning, so
those terms allow ``"mean"`` alone). The default, ``"mean"``, is what every published recipe uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

REDUCTIONS: tuple[str, ...] = ("mean", "sum")


class LossTerm(nn.Module):
    """Base class of every generator loss term.

    Args:
        weight: the term's weight in its recipe: a finite number >= 0 (0 switches the term off,
            but a recipe still knows it: the GAN warm-up uses the pixel term whatever its weight).
        reduction: one of the subclass's ``reductions``.

    Raises:
        ValueError: naming the term (its config key) for a weight that is negative, NaN or infinite,
            or a reduction the term does not support.

    Subclasses set ``key`` (the config key that switches the term on in a recipe) and implement
    :meth:`forward`, which takes the SR and HR batches (``(N, 1, H, W)`` float in [0, 1]) and,
    for the terms that need a discriminator, its logits and features as keywords, and returns the
    unweighted 0-d loss, differentiable with respect to ``sr``.
    """

    key: ClassVar[str] = ""
    reductions: ClassVar[tuple[str, ...]] = REDUCTIONS

    def __init__(self, weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss term {self.key!r}: weight must be a finite number >= 0, got {weight!r}")
        if reduction not in self.reductions:
            raise ValueError(f"loss term {self.key!r}: reduction must be one of {', '.join(self.reductions)}, "
                             f"got {reduction!r}")
        self.weight = float(weight)
        self.reduction = reduction

    @property
    def log_name(self) -> str:
        """The name its value is logged under (the key, unless the term says more, e.g. ``pixel_l1``)."""
        return self.key

    def forward(self, sr: Tensor, hr: Tensor, *, fake_logits: Tensor | None = None,
                real_logits: Tensor | None = None, fake_features: Sequence[Tensor] | None = None,
                real_features: Sequence[Tensor] | None = None) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, reduction={self.reduction!r}"


def reduce(values: Tensor, reduction: str) -> Tensor:
    """``values.mean()`` or ``values.sum()``; ``reduction`` is checked by :class:`LossTerm`."""
    return values.sum() if reduction == "sum" else values.mean()
