"""Data consistency at inference: make an SR output agree with the LR image it came from.

A network can only add detail; it can also invent or remove it. Iterative back-projection
(Irani & Peleg 1991; the consistency-enforcing idea of Bahat & Michaeli 2020) corrects the
output until downsampling it gives back the input: ``x <- x + U(lr - D(x))``, with ``D`` the
antialiased bicubic downsampling (optionally after a Gaussian blur) and ``U`` plain bicubic
upsampling, the operators of :mod:`medsr.degradations` in torch. On a clean input this lifts
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

__all__ = ["ConsistencySettings", "consistency_strength", "estimate_noise_sigma", "project_to_input", "refine"]


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


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(4 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # reflect as for the data; an image no wider than the kernel's radius cannot be reflected (torch refuses)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    padded = F.pad(x, (radius, radius, radius, radius), mode=mode)
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


@lru_cache(maxsize=16)
def _lr_operator_kernel(scale: int, blur_sigma: float, size: int = 33) -> torch.Tensor:
    """``D(U(.))`` as an LR-space convolution kernel, from its impulse response.

    Bicubic upsampling by an integer ``scale`` and antialiased downsampling by it are both
    equivariant to one-LR-pixel shifts, so their composition is a convolution on the LR grid: the
    iterations can run at LR size and upsample once (5x fewer HR-size resamplings).
    """
    delta = torch.zeros(1, 1, size, size, dtype=torch.float64)
    delta[..., size // 2, size // 2] = 1.0
    up = F.interpolate(delta, scale_factor=float(scale), mode="bicubic", align_corners=False)
    response = F.interpolate(_blur(up, blur_sigma), size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True)[0, 0]
    centre = size // 2
    radius = centre
    while radius > 1 and float(response.abs().sum() - response[centre - radius + 1:centre + radius,
                                                                centre - radius + 1:centre + radius].abs().sum()) < 1e-7:
        radius -= 1  # drop rings that carry nothing
    kernel = response[centre - radius:centre + radius + 1, centre - radius:centre + radius + 1]
    return kernel.to(torch.float32)[None, None]


_CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic convolution constant


@lru_cache(maxsize=8)
def _bicubic_phases(scale: int) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Per output phase ``p`` of an integer-``scale`` bicubic upsampling (``align_corners=False``):
    the offset of its first input tap and its four weights (Keys' cubic convolution, a = -0.75)."""

    def near(x: float) -> float:  # |x| <= 1
        return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A

    phases = []
    for phase in range(scale):
        source = (phase + 0.5) / scale - 0.5
        first = math.floor(source)
        t = source - first
        phases.append((first - 1, (far(t + 1), near(t), near(1 - t), far(2 - t))))
    return tuple(phases)


def _bicubic_upsample(image: np.ndarray, scale: int) -> np.ndarray:
    """``F.interpolate(mode="bicubic", align_corners=False, scale_factor=scale)`` of a 2-D float32
    array (edges replicated, as torch clamps), up to float32 rounding.

    Written here because every output phase of an integer scale is a fixed 4-tap filter: as
    shifted sums it takes ~3 ms for 256^2 -> 1024^2 where torch's kernel takes ~9 ms (one thread),
    once per served request. Powers of two only: torch maps coordinates with the float32 ``1 /
    scale``, which is exact for them; other scales go through torch.
    """
    scale = int(scale)
    if scale & (scale - 1):
        upsampled = F.interpolate(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None],
                                  scale_factor=float(scale), mode="bicubic", align_corners=False)
        return upsampled[0, 0].numpy()
    height, width = image.shape
    phases = _bicubic_phases(scale)
    pad = max(max(-first for first, _ in phases), max(first + 3 for first, _ in phases), 0)
    padded = np.pad(np.asarray(image, dtype=np.float32), pad, mode="edge")
    rows = np.empty((height + 2 * pad, width, scale), dtype=np.float32)
    _phase_sums(padded, 1, width, phases, pad, [rows[:, :, phase] for phase in range(scale)])  # along W
    rows = rows.reshape(height + 2 * pad, width * scale)
    out = np.empty((height, scale, width * scale), dtype=np.float32)
    _phase_sums(rows, 0, height, phases, pad, [out[:, phase] for phase in range(scale)])  # along H
    return out.reshape(height * scale, width * scale)


def _phase_sums(padded: np.ndarray, axis: int, length: int, phases: tuple[tuple[int, tuple[float, ...]], ...],
                pad: int, outputs: list[np.ndarray]) -> None:
    """Write each phase's weighted sum of its 4 taps (``length`` outputs along ``axis`` of
    ``padded``) into that phase's view in ``outputs``."""

    def shifted(start: int) -> np.ndarray:
        window = [slice(None), slice(None)]
        window[axis] = slice(start, start + length)
        return padded[tuple(window)]

    for (first, weights), output in zip(phases, outputs, strict=True):
        start = pad + first
        acc = shifted(start) * np.float32(weights[0])
        for tap in range(1, 4):
            acc += shifted(start + tap) * np.float32(weights[tap])
        output[...] = acc


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
        residual = target - F.interpolate(_blur(x, blur_sigma), size=target.shape[-2:], mode="bicubic",
                                          align_corners=False, antialias=True)
        kernel = _lr_operator_kernel(int(scale), float(blur_sigma))
        pad = kernel.shape[-1] // 2
        mode = "reflect" if min(target.shape[-2:]) > pad else "replicate"
        total = residual.clone()
        for _ in range(int(steps) - 1):
            residual = residual - F.conv2d(F.pad(residual, (pad, pad, pad, pad), mode=mode), kernel)
            total += residual
    # x + U(total), written into U's buffer: the one HR-size array this allocates.
    out = _bicubic_upsample(total[0, 0].numpy(), int(scale))
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
