"""Data consistency at inference: make an SR output agree with the LR image it came from.

A network can only add detail; it can also invent or remove it. Iterative back-projection
(Irani & Peleg 1991; the consistency-enforcing idea of Bahat & Michaeli 2020) corrects the
output until downsampling it gives back the input: ``x <- x + U(lr - D(x))``, with ``D`` the
antialiased bicubic downsampling (optionally after a Gaussian blur) and ``U`` plain bicubic
upsampling, the operators of :mod:`medsr.ops` (the pairs' own). On a clean input this lifts
an over-smoothing model above bicubic by construction; on a noisy input the same step copies
the noise back in, so its strength follows the input's noise level: ``w = 1 / (1 + (sigma /
noise_threshold)^noise_exponent)`` with ``sigma`` a robust wavelet (MAD) estimate of the LR noise
over its flattest blocks (:func:`estimate_noise_sigma`) or a level the caller gives; the result is
``sr + w * (projected - sr)``.

The switch is steep (exponent 8) because both of its ends cost: a scan whose own reconstruction
noise (CT, processed radiographs) reads as sigma ~0.005 is a clean input whose noise belongs to the
reference, and a denoising network left alone there loses it; an input carrying added noise of
sigma ~0.01 is copied back in even by a weight of 0.01 (five steps amplify the high frequencies).

Arrays follow the contract of :mod:`medsr.data`: ``(1, H, W)`` float32 in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsr.data import check_contract
from medsr.metrics import psnr
from medsr.ops import bicubic_downsample, bicubic_upsample, bicubic_upsample_fast, gaussian_blur_torch

__all__ = ["ConsistencySettings", "consistency_psnr", "consistency_strength", "degrade_operator", "estimate_noise_sigma",
           "project_to_input", "refine", "reproject"]


@dataclass(frozen=True)
class ConsistencySettings:
    """``params.yaml: consistency``.

    ``steps``: back-projection iterations (0 switches the step off); ``noise_threshold``: the LR
    noise standard deviation (on the [0, 1] scale) at which the step's weight falls to one half;
    ``noise_exponent``: how steeply it falls there; ``blur_sigma``: the blur (HR px) that ``D``
    assumes before downsampling (0: the clean track's operator).
    """

    steps: int = 0
    noise_threshold: float = 0.004
    noise_exponent: float = 4.0
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"consistency.steps must be an integer >= 0, got {self.steps!r}")
        if not (math.isfinite(self.noise_threshold) and self.noise_threshold > 0):
            raise ValueError(f"consistency.noise_threshold must be > 0, got {self.noise_threshold!r}")
        if not (math.isfinite(self.noise_exponent) and self.noise_exponent > 0):
            raise ValueError(f"consistency.noise_exponent must be > 0, got {self.noise_exponent!r}")
        if not (math.isfinite(self.blur_sigma) and self.blur_sigma >= 0):
            raise ValueError(f"consistency.blur_sigma must be >= 0, got {self.blur_sigma!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    @classmethod
    def from_params(cls, section: Mapping[str, Any] | None) -> ConsistencySettings:
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"consistency: unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**section)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_noise_sigma(lr: np.ndarray, flat_fraction: float = 0.5) -> float:
    """Robust estimate of the noise standard deviation of ``lr``: the median absolute Haar diagonal
    detail (Donoho's MAD / 0.6745) over the flattest ``flat_fraction`` of 2x2 blocks.

    Written here rather than scikit-image's ``estimate_sigma`` (the same MAD over every block):
    on small medical images the sharp body/air border and the brain's edges dominate the detail
    band, so a clean template slice reads as noisy; restricting the median to blocks whose local
    gradient is low keeps edges out (the usual low-texture-patch refinement).
    """
    from scipy import ndimage

    check_contract(lr, "LR image")
    h, w = (lr.shape[-2] // 2) * 2, (lr.shape[-1] // 2) * 2
    if min(h, w) < 4:
        return 0.0
    x = lr[0, :h, :w].astype(np.float64)
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    diagonal = (a - b - c + d) / 2.0
    mean = (a + b + c + d) / 4.0
    gradient = np.hypot(ndimage.sobel(mean, 0), ndimage.sobel(mean, 1))
    flat = gradient <= np.quantile(gradient, flat_fraction)
    sigma = float(np.median(np.abs(diagonal[flat])) / 0.6745)
    return sigma if math.isfinite(sigma) else 0.0


def consistency_strength(noise_sigma: float, noise_threshold: float, noise_exponent: float = 4.0) -> float:
    """The back-projection weight in [0, 1] for an input with this noise level (1 when clean)."""
    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma}")
    return 1.0 / (1.0 + (noise_sigma / noise_threshold) ** noise_exponent)


def degrade_operator(x: torch.Tensor, scale: int, blur_sigma: float) -> torch.Tensor:
    """``D``: the Gaussian blur of ``blur_sigma`` HR px, then antialiased bicubic down by ``scale``
    (the degradation of :func:`medsr.degradations.degrade_standard` without its noise), on an
    ``(N, C, H, W)`` tensor. The back-projection and the consistency score both use it."""
    return bicubic_downsample(gaussian_blur_torch(x, blur_sigma), int(scale))


@lru_cache(maxsize=16)
def _lr_operator_kernel(scale: int, blur_sigma: float, size: int = 33) -> torch.Tensor:
    """``D(U(.))`` as an LR-space convolution kernel, from its impulse response.

    Bicubic upsampling by an integer ``scale`` and antialiased downsampling by it are both
    equivariant to one-LR-pixel shifts, so their composition is a convolution on the LR grid: the
    iterations can run at LR size and upsample once (5x fewer HR-size resamplings).
    """
    delta = torch.zeros(1, 1, size, size, dtype=torch.float64)
    delta[..., size // 2, size // 2] = 1.0
    response = degrade_operator(bicubic_upsample(delta, scale), scale, blur_sigma)[0, 0]
    centre = size // 2
    radius = centre
    while radius > 1 and float(response.abs().sum() - response[centre - radius + 1:centre + radius,
                                                                centre - radius + 1:centre + radius].abs().sum()) < 1e-7:
        radius -= 1  # drop rings that carry nothing
    kernel = response[centre - radius:centre + radius + 1, centre - radius:centre + radius + 1]
    return kernel.to(torch.float32)[None, None]


def project_to_input(sr: np.ndarray, lr: np.ndarray, scale: int, *, steps: int, blur_sigma: float = 0.0) -> np.ndarray:
    """``steps`` back-projection iterations of ``sr`` towards ``D(sr) == lr``; returns a new array.

    ``x_{k+1} = x_k + U(lr - D(x_k))``, i.e. the LR residual evolves as ``e_{k+1} = e_k - DU(e_k)``
    and ``x_K = x_0 + U(e_0 + ... + e_{K-1})``: computed that way, with ``DU`` as an LR convolution
    (:func:`_lr_operator_kernel`), and clamped to [0, 1] once at the end.
    """
    check_contract(sr, "SR image")
    check_contract(lr, "LR image")
    if sr.shape[-2:] != (lr.shape[-2] * scale, lr.shape[-1] * scale):
        raise ValueError(f"SR image {sr.shape[-2:]} is not LR image {lr.shape[-2:]} times scale {scale}")
    if steps <= 0:
        return np.array(sr, dtype=np.float32, copy=True)
    with torch.no_grad():
        # Copies: the inputs may be read-only memory maps, and torch must not alias them.
        x = torch.from_numpy(np.array(sr, dtype=np.float32))[None]
        target = torch.from_numpy(np.array(lr, dtype=np.float32))[None]
        residual = target - degrade_operator(x, scale, blur_sigma)
        kernel = _lr_operator_kernel(int(scale), float(blur_sigma))
        pad = kernel.shape[-1] // 2
        mode = "reflect" if min(target.shape[-2:]) > pad else "replicate"
        total = residual.clone()
        for _ in range(int(steps) - 1):
            residual = residual - F.conv2d(F.pad(residual, (pad, pad, pad, pad), mode=mode), kernel)
            total += residual
    # x + U(total), written into U's buffer: the one HR-size array this allocates.
    out = bicubic_upsample_fast(total[0, 0].numpy(), int(scale))
    out += x[0, 0].numpy()
    return np.clip(out, 0.0, 1.0, out=out)[None]


def refine(sr: np.ndarray, lr: np.ndarray, scale: int, settings: ConsistencySettings,
           noise_sigma: float | None = None) -> np.ndarray:
    """``sr`` moved towards consistency with ``lr`` by the noise-dependent weight (module docstring).

    ``noise_sigma``: the LR noise level when the caller knows it; None estimates it from ``lr``.
    Returns ``sr`` unchanged (a copy) when the settings switch the step off.
    """
    if not settings.enabled:
        return np.array(sr, dtype=np.float32, copy=True)
    sigma = estimate_noise_sigma(lr) if noise_sigma is None else float(noise_sigma)
    weight = consistency_strength(sigma, settings.noise_threshold, settings.noise_exponent)
    projected = project_to_input(sr, lr, scale, steps=settings.steps, blur_sigma=settings.blur_sigma)
    # sr + w * (projected - sr), in projected's buffer (the same float operations, no temporaries).
    projected -= sr
    projected *= np.float32(weight)
    projected += sr
    return np.clip(projected, 0.0, 1.0, out=projected)


CONSISTENCY_BORDER = 1
"""LR pixels cropped on every side before the consistency PSNR (padding-dependent pixels)."""


def reproject(sr: np.ndarray, scale: int, blur_sigma: float) -> np.ndarray:
    """``D(sr)`` (:func:`degrade_operator`) of a contract image, clipped to the contract."""
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(sr, dtype=np.float32))[None]
        down = degrade_operator(tensor, scale, blur_sigma)[0].numpy()
    return np.clip(down, 0.0, 1.0, out=down)


def consistency_psnr(sr: np.ndarray, lr: np.ndarray, scale: int, blur_sigma: float) -> float:
    """PSNR (dB) of the re-degraded SR output against the LR input it was made from.

    High (40 dB and more for a faithful model) when the output explains its input; low when
    the model added or removed structure that the input does not support.

    Raises:
        ValueError: ``sr`` is not ``scale`` times ``lr``.
    """
    if sr.shape[1:] != (lr.shape[1] * scale, lr.shape[2] * scale):
        raise ValueError(f"SR shape {sr.shape} is not {scale} x LR shape {lr.shape}")
    border = CONSISTENCY_BORDER if min(lr.shape[1:]) > 2 * CONSISTENCY_BORDER else 0
    return psnr(reproject(sr, scale, blur_sigma), lr, border=border)
