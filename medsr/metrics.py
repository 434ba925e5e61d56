"""Image quality metrics: the one PSNR/SSIM definition used by training, benchmark and serving.

Every number MedSR reports is computed the same way:

* on 1-channel images that satisfy the array contract (float32 ``(1, H, W)`` in ``[0, 1]``),
  with ``data_range=1.0``; no gray-to-RGB copy and no "Y channel" (that inflates PSNR by
  about 1.3 dB on gray images);
* after cropping ``border`` pixels (the scale factor) from every side of both images, because
  the outermost pixels of any upscaler depend on its padding convention rather than on the data;
* per image, then averaged (the mean of per-image scores, never one score of pooled pixels);
* SSIM as Wang et al. 2004: 11-tap Gaussian window with sigma 1.5, population covariance,
  via scikit-image so that the numbers are comparable with published ones.

PSNR of identical images is infinite; it is capped at :data:`PSNR_CAP_DB` so that means,
JSON files and MLflow metrics stay finite (an image scoring the cap is an exact copy).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB: float = 100.0
SSIM_GAUSSIAN_SIGMA: float = 1.5
# scikit-image truncates the Gaussian at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5, 11 taps.
SSIM_WINDOW: int = 11


def _cropped_planes(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (1, H, W) pair and return the 2-D planes without ``border`` pixels per side."""
    sr = np.asarray(sr)
    hr = np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR shape {sr.shape} differs from HR shape {hr.shape}")
    if sr.ndim != 3 or sr.shape[0] != 1:
        raise ValueError(f"expected single images of shape (1, H, W), got {sr.shape}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    h, w = hr.shape[-2:]
    if h - 2 * border < 1 or w - 2 * border < 1:
        raise ValueError(f"border {border} leaves nothing of a {h}x{w} image")
    crop = (slice(border, h - border), slice(border, w - border))
    # float64 so that PSNR near the cap is not limited by float32 rounding.
    return sr[0][crop].astype(np.float64), hr[0][crop].astype(np.float64)


def psnr(sr: np.ndarray, hr: np.ndarray, *, border: int) -> float:
    """PSNR in dB of one (1, H, W) image against its reference, capped at ``PSNR_CAP_DB``."""
    sr_plane, hr_plane = _cropped_planes(sr, hr, border)
    if np.array_equal(sr_plane, hr_plane):
        return PSNR_CAP_DB  # skimage would divide by zero
    value = float(peak_signal_noise_ratio(hr_plane, sr_plane, data_range=1.0))
    return min(value, PSNR_CAP_DB)


def ssim(sr: np.ndarray, hr: np.ndarray, *, border: int) -> float:
    """SSIM (Wang et al. 2004, Gaussian 11x11 window, sigma 1.5) of one (1, H, W) image."""
    return ssim_with_foreground(sr, hr, None, border=border)[0]


# --------------------------------------------------------------------------- foreground-aware scores
# On CT and MRI most of a slice can be background (air, exact zeros in the HR image); noise there
# decides whole-image SSIM, so a model that merely zeroes the background looks good without
# seeing the body or brain. These scores are computed inside a body/brain mask of the HR image.

FOREGROUND_MODALITIES: tuple[str, ...] = ("ct", "mri")
MIN_FOREGROUND_FRACTION: float = 0.02  # below this the mask is noise, not anatomy: no foreground score


def foreground_mask(hr: np.ndarray, *, border: int) -> np.ndarray | None:
    """Body/brain mask of a (1, H, W) HR image (Otsu threshold, holes filled), border-cropped.

    None when the image is flat or the mask covers under ``MIN_FOREGROUND_FRACTION`` of it.
    """
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import threshold_otsu

    _, plane = _cropped_planes(hr, hr, border)
    if float(plane.max()) == float(plane.min()):
        return None
    mask = binary_fill_holes(plane > threshold_otsu(plane))
    return mask if float(mask.mean()) >= MIN_FOREGROUND_FRACTION else None


def psnr_in_mask(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray, *, border: int) -> float:
    """PSNR in dB over the pixels of ``mask`` (the border-cropped grid), capped like :func:`psnr`."""
    sr_plane, hr_plane = _cropped_planes(sr, hr, border)
    mse = float(np.mean((sr_plane[mask] - hr_plane[mask]) ** 2))
    return PSNR_CAP_DB if mse == 0.0 else min(10.0 * np.log10(1.0 / mse), PSNR_CAP_DB)


def ssim_in_mask(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray, *, border: int) -> float:
    """Mean of the SSIM map (same window as :func:`ssim`) over the pixels of ``mask``."""
    return ssim_with_foreground(sr, hr, mask, border=border)[1]


def ssim_with_foreground(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None, *, border: int) -> tuple[float, float]:
    """(:func:`ssim`, its map's mean inside ``mask``) from one SSIM computation (NaN without a mask).

    Like scikit-image's mean, the masked mean leaves out the map's outer half-window, where the
    window hangs over the image edge.
    """
    sr_plane, hr_plane = _cropped_planes(sr, hr, border)
    if min(hr_plane.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after the {border}-pixel border crop, "
            f"got {hr_plane.shape[0]}x{hr_plane.shape[1]}"
        )
    mean, ssim_map = structural_similarity(hr_plane, sr_plane, gaussian_weights=True, sigma=SSIM_GAUSSIAN_SIGMA,
                                           use_sample_covariance=False, data_range=1.0, full=True)
    if mask is None:
        return float(mean), float("nan")
    pad = (SSIM_WINDOW - 1) // 2
    inner = np.zeros_like(mask)
    inner[pad:-pad, pad:-pad] = mask[pad:-pad, pad:-pad]
    return float(mean), (float(ssim_map[inner].mean()) if inner.any() else float("nan"))


def score_image(sr: np.ndarray, hr: np.ndarray, *, scale: int, modality: str,
                foreground: bool = True) -> dict[str, float]:
    """The scores of one prediction that every report averages (training validation, the benchmark,
    ``medsr evaluate``, the registry): ``psnr`` and ``ssim`` with ``border = scale``, plus
    ``psnr_fg``/``ssim_fg`` inside the foreground mask for CT and MRI (NaN where there is none, and
    with ``foreground=False``, which skips the mask for a caller that never reads them)."""
    wanted = foreground and modality in FOREGROUND_MODALITIES
    mask = foreground_mask(hr, border=scale) if wanted else None
    whole, inside = ssim_with_foreground(sr, hr, mask, border=scale)
    return {"psnr": psnr(sr, hr, border=scale), "ssim": whole,
            "psnr_fg": psnr_in_mask(sr, hr, mask, border=scale) if mask is not None else math.nan, "ssim_fg": inside}
