"""The image operators: one Gaussian blur and one bicubic resampling for the whole project.

The degradations that make the pairs, the consistency step, the served consistency score, the
web page, the generators' bicubic skip and the file writers all resample and blur through this
module, so "degrade the output again and compare with the input" uses the very operator the
input was made with.

Gaussian blur
    :func:`gaussian_blur` is the definition: scipy's ``gaussian_filter`` on the last two axes,
    ``mode="reflect"`` (the edge sample repeated: ``d c b a | a b c d``), taps out to
    ``int(4 * sigma + 0.5)``. It computes in float64 and the pair bytes depend on it.
    :func:`gaussian_blur_torch` is the same operator (the same taps from :func:`gaussian_taps`,
    the same border from :func:`reflect_indices`) as a float32 separable convolution on tensors:
    the consistency step runs in torch, and the served score cannot pay scipy's float64 time on
    a large result. The two agree to float32 rounding (``tests/test_ops.py``).

Bicubic
    :func:`bicubic_resize` is the definition: ``F.interpolate(mode="bicubic",
    align_corners=False)``, Keys' cubic convolution with a = -0.75, pixels as areas;
    ``antialias=True`` widens the kernel when downscaling (as PIL and MATLAB ``imresize`` do).
    :func:`bicubic_upsample` (integer factor) and :func:`bicubic_downsample` (antialiased) are
    that call at a factor. :func:`bicubic_upsample_fast` is the upsampling as fixed 4-tap filters
    per output phase in numpy, equal to :func:`bicubic_upsample` to float32 rounding.

Nothing here clips: blurring and resampling are linear operators, and a caller holding images
under the array contract (:mod:`medsr.data`) clips where the contract asks for it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

GAUSSIAN_TRUNCATE = 4.0
"""Standard deviations the blur kernel reaches on each side (scipy's default)."""

CUBIC_A = -0.75
"""torch's (and OpenCV's) bicubic convolution constant."""


# --------------------------------------------------------------------------------------------
# Gaussian blur
# --------------------------------------------------------------------------------------------


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"blur sigma must be a finite number >= 0, got {sigma!r}")
    return sigma


def gaussian_radius(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> int:
    """Half-width in pixels of :func:`gaussian_blur`'s kernel: ``int(truncate * sigma + 0.5)`` (scipy's rule)."""
    return int(truncate * _check_sigma(sigma) + 0.5)


def gaussian_taps(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> np.ndarray:
    """The normalised 1-D kernel of :func:`gaussian_blur`: float64, ``2 * radius + 1`` taps
    (:func:`gaussian_radius`)."""
    sigma = _check_sigma(sigma)
    radius = gaussian_radius(sigma, truncate)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def reflect_indices(length: int, radius: int) -> np.ndarray:
    """Source index of every sample of an axis of ``length`` padded by ``radius`` on each side,
    under scipy's ``reflect`` border (period ``2 * length``; any radius, even past the length)."""
    positions = np.arange(-radius, length + radius) % (2 * length)
    return np.where(positions >= length, 2 * length - 1 - positions, positions)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur of ``sigma`` pixels over the last two axes (the definition).

    ``image``: any float array of at least 2 dimensions; leading axes are not blurred. Returns
    a new array of the same shape and dtype; ``sigma == 0`` returns a copy.

    Raises:
        ValueError: ``sigma`` negative or not finite.
    """
    from scipy import ndimage

    sigma = _check_sigma(sigma)
    if sigma == 0.0:
        return np.array(image, copy=True)
    sigmas = (0.0,) * (image.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(image, sigma=sigmas, mode="reflect", truncate=GAUSSIAN_TRUNCATE)


def gaussian_blur_torch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`gaussian_blur` of an ``(N, C, H, W)`` tensor as a separable convolution in ``x``'s dtype.

    Returns a new tensor (``x`` itself when ``sigma == 0``: callers never write into it).
    """
    sigma = _check_sigma(sigma)
    if sigma == 0.0:
        return x
    kernel = torch.from_numpy(gaussian_taps(sigma)).to(dtype=x.dtype, device=x.device)
    radius = kernel.numel() // 2
    height, width = x.shape[-2:]
    batch = x.reshape(-1, 1, height, width)
    rows = torch.from_numpy(reflect_indices(height, radius)).to(x.device)
    cols = torch.from_numpy(reflect_indices(width, radius)).to(x.device)
    # Weighted sums of shifted views, one axis at a time, accumulated in place: a few image-sized
    # buffers. Two F.conv2d passes with 1 x k and k x 1 kernels took 4.8 GiB above the input on the
    # CPU for one 8192^2 image (the consistency score of a 2k X-ray at x4), this 0.5 GiB.
    padded = batch.index_select(-1, cols)
    across = padded[..., 0:width] * kernel[0]
    for tap in range(1, kernel.numel()):
        across.add_(padded[..., tap:tap + width], alpha=float(kernel[tap]))
    del padded
    padded = across.index_select(-2, rows)
    del across
    out = padded[..., 0:height, :] * kernel[0]
    for tap in range(1, kernel.numel()):
        out.add_(padded[..., tap:tap + height, :], alpha=float(kernel[tap]))
    return out.reshape(x.shape)


def gaussian_blur_fast(image: np.ndarray, sigma: float) -> np.ndarray:
    """:func:`gaussian_blur` of a float32 array through :func:`gaussian_blur_torch` (float32)."""
    if _check_sigma(sigma) == 0.0:
        return np.array(image, dtype=np.float32, copy=True)
    plane = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    with torch.no_grad():
        blurred = gaussian_blur_torch(plane.reshape(1, -1, *plane.shape[-2:]), sigma)
    return blurred.reshape(image.shape).numpy()


# --------------------------------------------------------------------------------------------
# Bicubic
# --------------------------------------------------------------------------------------------


def bicubic_resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, *, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of an ``(N, C, H, W)`` tensor to ``size = (height, width)`` (the definition)."""
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bicubic", align_corners=False,
                         antialias=antialias)


def bicubic_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling by an integer factor: ``(N, C, h, w) -> (N, C, h*scale, w*scale)``.

    The ``bicubic`` baseline, the global skip of every generator and the back-projection's ``U``,
    so "better than bicubic" compares against exactly the image the networks start from.
    """
    return F.interpolate(x, scale_factor=float(scale), mode="bicubic", align_corners=False)


def bicubic_downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling by an integer factor (H and W divisible by it, or floored)."""
    return bicubic_resize(x, (x.shape[-2] // int(scale), x.shape[-1] // int(scale)), antialias=True)


@lru_cache(maxsize=8)
def _bicubic_phases(scale: int) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Per output phase ``p`` of an integer-``scale`` upsampling (``align_corners=False``): the
    offset of its first input tap and its four weights (Keys' cubic convolution)."""

    def near(t: float) -> float:  # |t| <= 1
        return ((CUBIC_A + 2) * t - (CUBIC_A + 3)) * t * t + 1

    def far(t: float) -> float:  # 1 < |t| < 2
        return ((CUBIC_A * t - 5 * CUBIC_A) * t + 8 * CUBIC_A) * t - 4 * CUBIC_A

    phases = []
    for phase in range(scale):
        source = (phase + 0.5) / scale - 0.5
        first = math.floor(source)
        t = source - first
        phases.append((first - 1, (far(t + 1), near(t), near(1 - t), far(2 - t))))
    return tuple(phases)


def bicubic_upsample_fast(image: np.ndarray, scale: int) -> np.ndarray:
    """:func:`bicubic_upsample` of a 2-D float32 array (edges replicated, as torch clamps).

    Every output phase of an integer scale is a fixed 4-tap filter, so the upsampling is shifted
    sums (about 3x faster than torch's kernel on one thread, once per served request). Powers of
    two only: torch maps coordinates with the float32 ``1 / scale``, exact for them; other
    scales go through :func:`bicubic_upsample`.
    """
    scale = int(scale)
    if scale & (scale - 1):
        with torch.no_grad():
            tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
            return bicubic_upsample(tensor, scale)[0, 0].numpy()
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
