"""Pixel-space terms: L1 / MSE / log-MSE, total variation, Sobel-gradient L1.

``log_mse`` trains for what the benchmark reports, the mean per-image PSNR: each patch's
gradient is scaled by 1/its MSE, so a flat, low-noise radiograph patch whose errors are 100x
smaller than a brain slice's still counts as much in dB (with a plain mean the brain decides
alone, and the x4 model never learned to denoise the radiograph).

Total variation is *summed* over each image's pixels: SRGAN's TV weight 2e-8 belongs to a summed
TV (intensities in [0, 1]); with a per-pixel mean the weighted term was ~1e-9, zero in effect.
Summed, a 96x96 patch of typical medical texture gives ~2e-6..1e-5 next to an MSE of ~1e-3: the
weak smoothness prior the paper meant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medsr.losses.base import LossTerm, reduce

PIXEL_KINDS: tuple[str, ...] = ("l1", "mse", "log_mse")
LOG_MSE_FLOOR = 1e-10  # keeps log finite for a patch predicted exactly; far below any real error


def _log_mse(sr: Tensor, hr: Tensor, reduction: str) -> Tensor:
    per_patch = (sr - hr).pow(2).flatten(1).mean(dim=1)
    return reduce(10.0 * torch.log10(per_patch + LOG_MSE_FLOOR), reduction)


_PIXEL_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, str], Tensor]] = {
    "l1": lambda sr, hr, reduction: F.l1_loss(sr, hr, reduction=reduction),
    "mse": lambda sr, hr, reduction: F.mse_loss(sr, hr, reduction=reduction),
    "log_mse": _log_mse,
}


def pixel_loss(sr: Tensor, hr: Tensor, kind: str = "l1", reduction: str = "mean") -> Tensor:
    """Absolute (``l1``) or squared (``mse``) error over every pixel, or ``log_mse``: each patch's
    ``10 log10(MSE)`` (minus its PSNR) over the batch; ``reduction`` ``"mean"`` or ``"sum"``.

    Raises ValueError for an unknown ``kind``, listing :data:`PIXEL_KINDS`.
    """
    function = _PIXEL_FUNCTIONS.get(kind)
    if function is None:
        raise ValueError(f"unknown pixel loss {kind!r}; expected one of {', '.join(PIXEL_KINDS)}")
    return function(sr, hr, reduction)


def total_variation_loss(x: Tensor, reduction: str = "mean") -> Tensor:
    """Anisotropic total variation summed over each image's pixels, then averaged (``"mean"``) or
    summed (``"sum"``) over the batch (module docstring: why summed per image)."""
    per_image = ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(dim=1)
                 + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(dim=1))
    return reduce(per_image, reduction)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0


def sobel_gradients(x: Tensor) -> Tensor:
    """Horizontal and vertical Sobel responses of a 1-channel batch, ``(N, 2, H, W)``."""
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1).to(device=x.device, dtype=x.dtype)
    # Replicate padding: a zero border would add a fake edge around every patch.
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def gradient_loss(sr: Tensor, hr: Tensor, reduction: str = "mean") -> Tensor:
    """L1 distance between Sobel gradients: penalises blurred or displaced edges (BliMSR)."""
    return F.l1_loss(sobel_gradients(sr), sobel_gradients(hr), reduction=reduction)


class PixelLoss(LossTerm):
    """``pixel``: :func:`pixel_loss` of SR against HR. ``kind``: one of :data:`PIXEL_KINDS`
    (ValueError naming the term otherwise). Logged as ``pixel_<kind>``."""

    key = "pixel"

    def __init__(self, weight: float = 1.0, reduction: str = "mean", kind: str = "l1") -> None:
        super().__init__(weight, reduction)
        if kind not in PIXEL_KINDS:
            raise ValueError(f"loss term 'pixel': kind must be one of {', '.join(PIXEL_KINDS)}, got {kind!r}")
        self.kind = kind

    @property
    def log_name(self) -> str:
        return f"pixel_{self.kind}"

    def forward(self, sr: Tensor, hr: Tensor, **_discriminator_outputs: Tensor | Sequence[Tensor] | None) -> Tensor:
        return pixel_loss(sr, hr, self.kind, self.reduction)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}"


class TotalVariationLoss(LossTerm):
    """``tv``: :func:`total_variation_loss` of SR (a smoothness prior; HR is not used)."""

    key = "tv"

    def forward(self, sr: Tensor, hr: Tensor, **_discriminator_outputs: Tensor | Sequence[Tensor] | None) -> Tensor:
        return total_variation_loss(sr, self.reduction)


class GradientLoss(LossTerm):
    """``gradient``: :func:`gradient_loss`, L1 between the Sobel gradients of SR and HR."""

    key = "gradient"

    def forward(self, sr: Tensor, hr: Tensor, **_discriminator_outputs: Tensor | Sequence[Tensor] | None) -> Tensor:
        return gradient_loss(sr, hr, self.reduction)
