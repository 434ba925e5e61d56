"""Adversarial terms and the discriminator passes they need (discriminators return ``(N, 1)`` logits).

The generator's term is differentiable with respect to SR through the discriminator (the
Swift-SRGAN seed scored ``sr.detach()``, so its GAN phase never trained the generator); real
logits are detached, so the generator step never trains the discriminator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsr.losses.base import LossTerm


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_adversarial_loss(real_logits: Tensor, fake_logits: Tensor, *, relativistic: bool = False) -> Tensor:
    """Discriminator loss: vanilla BCE (SRGAN) or relativistic average (ESRGAN)."""
    if relativistic:
        return 0.5 * (_bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0))
    return 0.5 * (_bce(real_logits, 1.0) + _bce(fake_logits, 0.0))


def generator_adversarial_loss(fake_logits: Tensor, real_logits: Tensor | None = None, *,
                               relativistic: bool = False) -> Tensor:
    """Generator loss: non-saturating BCE, or relativistic average (needs ``real_logits``).

    Real logits are detached: the generator step must not train the discriminator.
    """
    if relativistic:
        if real_logits is None:
            raise ValueError("the relativistic adversarial loss needs the discriminator's logits on real images")
        real = real_logits.detach()
        return 0.5 * (_bce(real - fake_logits.mean(), 0.0) + _bce(fake_logits - real.mean(), 1.0))
    return _bce(fake_logits, 1.0)


def forward_with_features(module: nn.Module, *inputs: Tensor,
                          layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,)) -> tuple[Tensor, list[Tensor]]:
    """Run ``module(*inputs)`` and also return the outputs of its inner layers of ``layer_types``.

    Forward hooks rather than a special method, so that any discriminator works unchanged.
    """
    features: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: features.append(out))
               for m in module.modules() if isinstance(m, layer_types)]
    if not handles:
        wanted = [t.__name__ for t in layer_types]
        raise ValueError(f"{type(module).__name__} has no {wanted} layers to match features on")
    try:
        output = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return output, features


def discriminate_jointly(discriminator: nn.Module, real: Tensor, fake: Tensor, *condition: Tensor,
                         with_features: bool = False) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Score real and fake images in *one* forward pass over their concatenation.

    Returns ``(real_logits, fake_logits, real_features, fake_features)``. One pass means every
    BatchNorm layer normalises real and fake with the same batch statistics (and updates its
    running statistics once): with two passes in train mode each half is normalised by its own
    mean and variance, so feature matching compares features on two different scales and the
    discriminator can tell real from fake by batch statistics alone. ``condition`` (the LR
    input of a conditional discriminator) is repeated for both halves.
    """
    n = real.shape[0]
    if fake.shape != real.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} batches differ in shape")
    inputs = (torch.cat([real, fake]), *(torch.cat([c, c]) for c in condition))
    if with_features:
        logits, features = forward_with_features(discriminator, *inputs)
    else:
        logits, features = discriminator(*inputs), []
    return logits[:n], logits[n:], [f[:n] for f in features], [f[n:] for f in features]


class AdversarialLoss(LossTerm):
    """``adversarial``: :func:`generator_adversarial_loss` on the discriminator's logits.

    ``relativistic``: False for SRGAN's non-saturating BCE, True for ESRGAN's relativistic average
    (the trainer then trains the discriminator with the matching loss). Reduction ``"mean"`` only.
    Calling it without ``fake_logits`` (or, relativistic, ``real_logits``) raises ValueError.
    """

    key = "adversarial"
    reductions = ("mean",)

    def __init__(self, weight: float = 1.0, reduction: str = "mean", relativistic: bool = False) -> None:
        super().__init__(weight, reduction)
        if not isinstance(relativistic, bool):
            raise ValueError(f"loss term 'adversarial': relativistic must be true or false, got {relativistic!r}")
        self.relativistic = relativistic

    def forward(self, sr: Tensor, hr: Tensor, *, fake_logits: Tensor | None = None,
                real_logits: Tensor | None = None, **_features: Sequence[Tensor] | None) -> Tensor:
        if fake_logits is None:
            raise ValueError("loss term 'adversarial' needs the discriminator's logits on SR images")
        return generator_adversarial_loss(fake_logits, real_logits, relativistic=self.relativistic)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relativistic={self.relativistic}"
