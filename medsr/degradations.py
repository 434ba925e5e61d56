"""Degradations: pure functions that turn an HR image into the LR image a model must restore.

Every function here follows the array contract of :mod:`medsr.data` on both sides: it takes a
``float32`` ``(1, H, W)`` image with values in ``[0, 1]`` and returns a new ``float32``
``(1, h, w)`` image, clipped to ``[0, 1]``. The functions are pure:

* the input array is never modified and the output never shares memory with it;
* all randomness comes from an explicit :class:`numpy.random.Generator` argument, so the same
  image and the same generator state give byte-identical outputs (use :func:`rng_for` to derive
  one generator per image from the global seed and the image's id).

The pair kinds built from these pieces:

* :func:`degrade_standard`: Gaussian blur, antialiased bicubic down, modality noise. With fixed
  parameters (blur 0.6, the modality's noise level) it is the ``realistic`` evaluation track; the
  ``clean`` track is :func:`degrade_bicubic` alone (antialiased bicubic, the SR literature's
  protocol and what a resampled study looks like). The training pairs draw blur and noise per
  pair from a range that includes clean (:func:`draw_standard_parameters`), so a model learns to
  denoise only as much as its input needs instead of smoothing clean inputs.
* :func:`degrade_blind`: a second-order random degradation (Real-ESRGAN, BliMSR) for blind SR.
* :func:`degrade_vlr`: the standard operator applied once more to an LR image (VLR = degrade(LR)),
  the self-supervised input of the light residual CNN, which never sees HR images.

Noise levels are all on the same scale: ``sigma``/``level`` is the noise standard deviation in
``[0, 1]`` intensity units (for Poisson noise, at full intensity 1.0).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from medsr import ops
from medsr.data import check_contract
from medsr.scale import check_scale

NOISE_KINDS: tuple[str, ...] = ("gaussian", "poisson", "rician", "none")
# The noise models the blind degradation draws from: X-ray/CT-like quantum noise or sensor noise.
BLIND_NOISE_KINDS: tuple[str, ...] = ("gaussian", "poisson")

__all__ = [
    "BLIND_NOISE_KINDS",
    "DEGRADATIONS",
    "NOISE_KINDS",
    "add_gaussian_noise",
    "add_modality_noise",
    "add_poisson_noise",
    "add_rician_noise",
    "crop_to_multiple",
    "degrade_bicubic",
    "degrade_blind",
    "degrade_standard",
    "degrade_vlr",
    "draw_standard_parameters",
    "StandardParameters",
    "gaussian_blur",
    "jpeg_compress",
    "resize_bicubic",
    "rng_for",
    "upsample_bicubic",
]


# --------------------------------------------------------------------------- helpers


TRACKS: tuple[str, ...] = ("clean", "realistic")
"""The evaluation tracks: ``clean`` is :func:`degrade_bicubic` alone, ``realistic`` is
:func:`degrade_standard` at the fixed blur and the modality's noise (``params.yaml: degrade``)."""


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator derived from ``seed`` and ``keys`` (e.g. image id, scale, pair kind).

    The derivation is the SHA-256 of the JSON list ``[seed, *keys]``, fed to PCG64: it is the
    same in every process and on every platform (Python's ``hash()`` is salted per process), and
    JSON keeps ``("a", "b")`` apart from ``("ab",)`` and ``1`` apart from ``"1"``.
    """
    for key in (seed, *keys):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"rng_for: seed and keys must be int or str, got {key!r}")
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode("utf-8")).digest()
    # PCG64 named explicitly so a change of numpy's default bit generator cannot change streams.
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def _check_image(img: np.ndarray, name: str = "image") -> None:
    check_contract(img, name)
    if img.shape[1] == 0 or img.shape[2] == 0:
        raise ValueError(f"{name}: empty image of shape {img.shape}")


def _check_level(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_divisible(img: np.ndarray, scale: int, name: str) -> None:
    h, w = img.shape[1:]
    if h % scale or w % scale:
        raise ValueError(
            f"{name} of shape {img.shape} (H={h}, W={w}) is not divisible by scale {scale}; "
            f"crop it first with crop_to_multiple(img, {scale})"
        )


def _clipped(values: np.ndarray) -> np.ndarray:
    """Fresh contiguous float32 copy clipped to [0, 1]."""
    out = np.array(values, dtype=np.float32, copy=True, order="C")
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    if len(bounds) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {bounds!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {bounds!r}")
    return lo, hi


# --------------------------------------------------------------------------- geometry


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom rows and right columns so that H and W are divisible by ``multiple``."""
    _check_image(img)
    multiple = check_scale(multiple, supported=None)
    h, w = img.shape[1:]
    ch, cw = h - h % multiple, w - w % multiple
    if ch == 0 or cw == 0:
        raise ValueError(f"image of shape {img.shape} is smaller than {multiple} pixels on a side")
    return np.array(img[:, :ch, :cw], dtype=np.float32, copy=True, order="C")


def resize_bicubic(img: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """Bicubic resize to ``size`` = (height, width) with torch on CPU, clipped to [0, 1].

    ``antialias=True`` widens the kernel by the downscale factor (as PIL and MATLAB ``imresize``
    do), so frequencies above the new Nyquist limit are removed instead of aliased. Bicubic
    overshoots at edges; the clip keeps the contract.
    """
    _check_image(img)
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
    height, width = int(size[0]), int(size[1])
    with torch.no_grad():
        batch = torch.from_numpy(img).unsqueeze(0)  # (1, 1, H, W); interpolate does not write to it
        resized = ops.bicubic_resize(batch, (height, width), antialias=antialias)
    return _clipped(resized[0].numpy())


def degrade_bicubic(img: np.ndarray, scale: int) -> np.ndarray:
    """Antialiased bicubic downscaling by an integer ``scale``; H and W must be divisible by it."""
    _check_image(img)
    scale = check_scale(scale, supported=None)
    _check_divisible(img, scale, "image")
    h, w = img.shape[1:]
    return resize_bicubic(img, (h // scale, w // scale), antialias=True)


def upsample_bicubic(img: np.ndarray, scale: int) -> np.ndarray:
    """Plain bicubic upscaling by ``scale``: the baseline every results table compares against."""
    _check_image(img)
    scale = check_scale(scale, supported=None)
    h, w = img.shape[1:]
    return resize_bicubic(img, (h * scale, w * scale), antialias=False)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur of standard deviation ``sigma`` pixels; ``sigma=0`` returns a copy."""
    _check_image(img)
    sigma = _check_level(sigma, "sigma")
    if sigma == 0.0:
        return img.copy()
    return _clipped(ops.gaussian_blur(img, sigma))


# --------------------------------------------------------------------------- noise


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation ``sigma``; ``sigma=0`` returns a copy."""
    _check_image(img)
    sigma = _check_level(sigma, "sigma")
    if sigma == 0.0:
        return img.copy()
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return _clipped(img + np.float32(sigma) * noise)


def add_poisson_noise(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Signal-dependent photon-counting noise (X-ray, CT): ``Poisson(x * peak) / peak``.

    ``peak = 1 / level**2`` photons at intensity 1.0, so the noise variance is ``x * level**2``:
    ``level`` is the noise standard deviation at full intensity (comparable with the Gaussian
    ``sigma``), darker pixels get less absolute noise, and ``level=0`` returns a copy.
    """
    _check_image(img)
    level = _check_level(level, "level")
    if level == 0.0:
        return img.copy()
    peak = 1.0 / level**2
    counts = rng.poisson(img.astype(np.float64) * peak)
    return _clipped(counts / peak)


def add_rician_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """MRI magnitude noise: ``sqrt((x + n1)**2 + n2**2)`` with ``n1, n2 ~ N(0, sigma**2)``.

    Complex Gaussian noise on the real and imaginary channels, then the magnitude; on a zero
    background this is Rayleigh noise with mean ``sigma * sqrt(pi / 2)``. ``sigma=0`` returns a copy.
    """
    _check_image(img)
    sigma = _check_level(sigma, "sigma")
    if sigma == 0.0:
        return img.copy()
    real = img + np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    return _clipped(np.hypot(real, imaginary))


def add_modality_noise(img: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """Noise of the given ``kind`` (one of :data:`NOISE_KINDS`) at ``level``; "none" returns a copy."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    if kind == "gaussian":
        return add_gaussian_noise(img, level, rng)
    if kind == "poisson":
        return add_poisson_noise(img, level, rng)
    if kind == "rician":
        return add_rician_noise(img, level, rng)
    _check_image(img)
    return img.copy()


# --------------------------------------------------------------------------- compression


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """8-bit grayscale JPEG round trip in memory with Pillow at ``quality`` (1-100).

    The 8-bit quantisation before encoding is part of the degradation: it is what a JPEG-exported
    image (PACS screenshots, web datasets) has been through.
    """
    _check_image(img)
    if isinstance(quality, bool) or int(quality) != quality or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
    pixels = np.round(img[0].astype(np.float64) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        restored = np.asarray(decoded.convert("L"), dtype=np.float32) / np.float32(255.0)
    return _clipped(restored[None])


# --------------------------------------------------------------------------- pair degradations


def degrade_standard(
    hr: np.ndarray,
    scale: int,
    *,
    blur_sigma: float,
    noise_kind: str,
    noise_level: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The standard pairs: Gaussian blur, antialiased bicubic down by ``scale``, modality noise.

    ``blur_sigma`` is in HR pixels; the noise is added in LR space, as a scanner adds it to what it
    records. H and W must be divisible by ``scale``.
    """
    _check_image(hr, "HR image")
    scale = check_scale(scale, supported=None)
    _check_divisible(hr, scale, "HR image")
    if noise_kind not in NOISE_KINDS:  # fail before the work, not after it
        raise ValueError(f"unknown noise kind {noise_kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    blurred = gaussian_blur(hr, blur_sigma)
    lr = degrade_bicubic(blurred, scale)
    return add_modality_noise(lr, noise_kind, noise_level, rng)


def degrade_vlr(
    lr: np.ndarray,
    scale: int,
    *,
    blur_sigma: float,
    noise_kind: str,
    noise_level: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Self-supervised input of the light residual CNN: VLR = :func:`degrade_standard` (LR).

    The network learns VLR -> LR and is then applied to LR -> HR, so the operator must be the same
    one that made LR from HR. LR's H and W must be divisible by ``scale``
    (crop with :func:`crop_to_multiple` first).
    """
    _check_image(lr, "LR image")
    scale = check_scale(scale, supported=None)
    _check_divisible(lr, scale, "LR image")
    return degrade_standard(lr, scale, blur_sigma=blur_sigma, noise_kind=noise_kind,
                            noise_level=noise_level, rng=rng)


@dataclass(frozen=True)
class StandardParameters:
    """Blur (HR px) and noise level of one :func:`degrade_standard` call."""

    blur_sigma: float
    noise_level: float

    def as_dict(self) -> dict[str, float]:
        return {"blur_sigma": self.blur_sigma, "noise_level": self.noise_level}


def draw_standard_parameters(
    rng: np.random.Generator,
    *,
    clean_fraction: float,
    blur_sigma: tuple[float, float],
    noise_factor: tuple[float, float],
    noise_level: float,
) -> StandardParameters:
    """One pair's blur and noise from the training range.

    With probability ``clean_fraction`` the pair is clean (no blur, no noise: exactly the clean
    track); otherwise blur ~ U(``blur_sigma``) and noise = ``noise_level`` x U(``noise_factor``).
    Three draws are always made, in that order, so the stream that follows (the noise samples)
    does not depend on which branch was taken.
    """
    if not 0.0 <= float(clean_fraction) <= 1.0:
        raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
    sigma_lo, sigma_hi = _check_range("blur_sigma", blur_sigma, 0.0, math.inf)
    factor_lo, factor_hi = _check_range("noise_factor", noise_factor, 0.0, math.inf)
    level = _check_level(noise_level, "noise_level")
    clean = float(rng.random()) < float(clean_fraction)
    sigma = float(rng.uniform(sigma_lo, sigma_hi))
    factor = float(rng.uniform(factor_lo, factor_hi))
    if clean:
        return StandardParameters(0.0, 0.0)
    return StandardParameters(sigma, min(level * factor, 1.0))


@dataclass(frozen=True)
class _BlindRound:
    """The random parameters of one round of the blind degradation."""

    blur_sigma: float
    resize_factor: float
    noise_kind: str
    noise_level: float
    jpeg_quality: int


def degrade_blind(
    hr: np.ndarray,
    scale: int,
    *,
    blur_sigma: tuple[float, float],
    resize_factor: tuple[float, float],
    noise_level: tuple[float, float],
    jpeg_quality: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Second-order random degradation (Real-ESRGAN, BliMSR) down to exactly (H/scale, W/scale).

    Two rounds of: Gaussian blur with sigma ~ U(blur_sigma), antialiased bicubic resize of the
    current image by a factor ~ U(resize_factor), Gaussian or Poisson noise (even odds) with level
    ~ U(noise_level), JPEG with quality ~ U{jpeg_quality}; then an antialiased bicubic resize to
    the LR size. All ten round parameters are drawn first, in that order for round 1 then round 2,
    so they depend only on the generator and not on the image size; the noise samples follow.
    """
    _check_image(hr, "HR image")
    scale = check_scale(scale, supported=None)
    _check_divisible(hr, scale, "HR image")
    sigma_lo, sigma_hi = _check_range("blur_sigma", blur_sigma, 0.0, math.inf)
    factor_lo, factor_hi = _check_range("resize_factor", resize_factor, 1e-3, math.inf)
    noise_lo, noise_hi = _check_range("noise_level", noise_level, 0.0, 1.0)
    quality_lo, quality_hi = _check_range("jpeg_quality", jpeg_quality, 1, 100)

    rounds = [
        _BlindRound(
            blur_sigma=float(rng.uniform(sigma_lo, sigma_hi)),
            resize_factor=float(rng.uniform(factor_lo, factor_hi)),
            noise_kind=BLIND_NOISE_KINDS[int(rng.integers(len(BLIND_NOISE_KINDS)))],
            noise_level=float(rng.uniform(noise_lo, noise_hi)),
            jpeg_quality=int(rng.integers(int(quality_lo), int(quality_hi), endpoint=True)),
        )
        for _ in range(2)
    ]

    image = hr
    for params in rounds:
        image = gaussian_blur(image, params.blur_sigma)
        h, w = image.shape[1:]
        new_size = (max(1, round(h * params.resize_factor)), max(1, round(w * params.resize_factor)))
        image = resize_bicubic(image, new_size, antialias=True)
        image = add_modality_noise(image, params.noise_kind, params.noise_level, rng)
        image = jpeg_compress(image, params.jpeg_quality)
    h, w = hr.shape[1:]
    return resize_bicubic(image, (h // scale, w // scale), antialias=True)


DEGRADATIONS: dict[str, Callable[..., np.ndarray]] = {
    fn.__name__: fn
    for fn in (
        gaussian_blur,
        resize_bicubic,
        degrade_bicubic,
        upsample_bicubic,
        add_gaussian_noise,
        add_poisson_noise,
        add_rician_noise,
        add_modality_noise,
        jpeg_compress,
        degrade_standard,
        degrade_blind,
        degrade_vlr,
    )
}
"""Public degradation ops by function name, for configs (``DEGRADATIONS["degrade_blind"]``)."""
