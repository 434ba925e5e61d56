"""Structural terms: differentiable SSIM and DSSIM ``(1 - SSIM) / 2``.

Written here rather than taken from scikit-image (numpy, no gradient) or torchmetrics (not a
dependency): a loss must be differentiable. It reproduces scikit-image's
structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1): skimage filters the whole image and then drops a 5-pixel border, which equals a
"valid" convolution with the same normalised 11-tap Gaussian (tests compare the two).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medsr.losses.base import LossTerm

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation: an 11x11 window
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def _gaussian_taps(device: torch.device) -> Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).to(device=device, dtype=torch.float32)


def _gaussian_filter_valid(x: Tensor, taps: Tensor) -> Tensor:
    channels = x.shape[1]
    horizontal = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim_torch(sr: Tensor, hr: Tensor) -> Tensor:
    """Differentiable mean SSIM of two batches in ``[0, 1]`` (data range 1); a 0-d tensor.

    Computed in float32 outside autocast: the variance terms are differences of nearly equal
    numbers and lose all precision in float16.
    """
    window = 2 * SSIM_RADIUS + 1
    if sr.shape[-1] < window or sr.shape[-2] < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(sr.shape[-2:])}")
    with torch.autocast(device_type=sr.device.type, enabled=False):
        x, y = sr.float(), hr.float()
        taps = _gaussian_taps(x.device)
        # One filtering pass over the five moments stacked along the channel axis.
        moments = _gaussian_filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)
        mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)
        var_x = xx - mu_x * mu_x
        var_y = yy - mu_y * mu_y
        cov = xy - mu_x * mu_y
        numerator = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
        denominator = (mu_x * mu_x + mu_y * mu_y + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
        return (numerator / denominator).mean()


def dssim_loss(sr: Tensor, hr: Tensor) -> Tensor:
    """Structural dissimilarity ``(1 - SSIM) / 2``, in ``[0, 1]``."""
    return (1.0 - ssim_torch(sr, hr)) / 2.0


class DSSIMLoss(LossTerm):
    """``dssim``: :func:`dssim_loss` of SR against HR; reduction ``"mean"`` only (the mean SSIM)."""

    key = "dssim"
    reductions = ("mean",)

    def forward(self, sr: Tensor, hr: Tensor, **_discriminator_outputs: Tensor | Sequence[Tensor] | None) -> Tensor:
        return dssim_loss(sr, hr)
