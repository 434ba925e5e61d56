"""The consistency step: back-projection onto the input, weighted by the input's noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsr import degradations as deg
from medsr.consistency import (ConsistencySettings, consistency_strength, estimate_noise_sigma, project_to_input,
                               refine)
from medsr.metrics import psnr


def _phantom(side: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    image = 0.3 + 0.3 * ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2) + 0.1 * np.sin(xx / 2.5)
    return np.clip(image, 0, 1).astype(np.float32)[None]


def _downsample(x: np.ndarray, scale: int) -> np.ndarray:
    t = torch.from_numpy(x)[None]
    return F.interpolate(t, size=(x.shape[1] // scale, x.shape[2] // scale), mode="bicubic", align_corners=False,
                         antialias=True)[0].numpy()


@pytest.mark.parametrize("scale", [2, 4])
def test_projection_makes_the_output_agree_with_its_input(scale: int) -> None:
    hr = _phantom()
    lr = deg.degrade_bicubic(hr, scale)
    smooth = deg.upsample_bicubic(deg.gaussian_blur(lr, 1.0), scale)  # an over-smoothing "model"
    before = np.abs(_downsample(smooth, scale) - lr).mean()
    projected = project_to_input(smooth, lr, scale, steps=20)
    after = np.abs(_downsample(projected, scale) - lr).mean()
    assert after < before / 5
    # Consistency with the true operator also brings the output closer to the HR image.
    assert psnr(projected, hr, border=scale) > psnr(smooth, hr, border=scale) + 0.5


def test_projection_uses_the_blur_it_is_told() -> None:
    hr = _phantom()
    lr = deg.degrade_bicubic(deg.gaussian_blur(hr, 1.2), 2)
    start = deg.upsample_bicubic(lr, 2)
    with_blur = project_to_input(start, lr, 2, steps=20, blur_sigma=1.2)
    blurred_down = _downsample(deg.gaussian_blur(with_blur, 1.2), 2)
    assert np.abs(blurred_down - lr).mean() < np.abs(_downsample(deg.gaussian_blur(start, 1.2), 2) - lr).mean() / 3


def test_strength_follows_the_noise() -> None:
    assert consistency_strength(0.0, 0.003) == 1.0
    assert consistency_strength(0.003, 0.003) == pytest.approx(0.5)
    assert consistency_strength(0.01, 0.003) < 0.02
    assert consistency_strength(0.001, 0.003) > 0.98
    # Steeper: the same half-way point, far less weight on a noisy input, far more on a mildly noisy one.
    assert consistency_strength(0.005, 0.005, 8) == pytest.approx(0.5)
    assert consistency_strength(0.0095, 0.005, 8) < 0.01 < consistency_strength(0.0095, 0.005, 4)
    assert consistency_strength(0.0035, 0.005, 8) > 0.94 > consistency_strength(0.0035, 0.005, 4)


def test_shipped_settings_keep_a_references_own_noise_and_keep_added_noise_out() -> None:
    # A scan with correlated noise of its own (0.006, as CT reconstructions have) is a clean input: a
    # denoising "model" loses to bicubic there, and the shipped settings must project it back above.
    from medsr.evaluation import HeldOutImage, with_noisy_reference
    from medsr.params import load_params

    params = load_params()
    settings = ConsistencySettings.from_params(params["consistency"])
    clean_hr = _phantom(256)
    image = HeldOutImage(key="phantom", modality="ct", source="phantom", track="clean", hr=clean_hr,
                         lr=deg.degrade_bicubic(clean_hr, 2))
    [noisy] = with_noisy_reference([image], 0.006, 1.0, 2, params["degrade"])
    denoised = deg.upsample_bicubic(deg.gaussian_blur(noisy.lr, 1.0), 2)
    bicubic = psnr(deg.upsample_bicubic(noisy.lr, 2), noisy.hr, border=2)
    assert psnr(denoised, noisy.hr, border=2) < bicubic - 3
    assert psnr(refine(denoised, noisy.lr, 2, settings), noisy.hr, border=2) > bicubic + 0.3
    # Added noise (0.01 in LR) must stay out: the denoised output is not pulled back towards it.
    noisy_lr = deg.add_gaussian_noise(image.lr, 0.01, np.random.default_rng(1))
    denoised = deg.upsample_bicubic(deg.gaussian_blur(noisy_lr, 1.0), 2)
    assert psnr(refine(denoised, noisy_lr, 2, settings), clean_hr, border=2) > psnr(denoised, clean_hr, border=2)


def test_noise_estimate_tracks_added_noise() -> None:
    lr = deg.degrade_bicubic(_phantom(256), 2)
    assert estimate_noise_sigma(lr) < 0.004
    noisy = deg.add_gaussian_noise(lr, 0.02, np.random.default_rng(0))
    assert estimate_noise_sigma(noisy) == pytest.approx(0.02, rel=0.2)
    assert estimate_noise_sigma(np.ones((1, 32, 32), np.float32)) < 1e-9  # flat: no detail, no noise


def test_refine_on_clean_input_fixes_an_over_smoothing_model_and_leaves_noisy_input_alone() -> None:
    settings = ConsistencySettings(steps=5, noise_threshold=0.003)
    hr = _phantom(256)
    lr = deg.degrade_bicubic(hr, 4)
    smooth = deg.upsample_bicubic(deg.gaussian_blur(lr, 1.0), 4)
    assert psnr(refine(smooth, lr, 4, settings), hr, border=4) > psnr(smooth, hr, border=4) + 0.5

    noisy_lr = deg.add_gaussian_noise(lr, 0.02, np.random.default_rng(1))
    denoised = deg.upsample_bicubic(deg.gaussian_blur(noisy_lr, 1.0), 4)
    refined = refine(denoised, noisy_lr, 4, settings)
    assert np.abs(refined - denoised).max() < 0.01  # the noise is not copied back in


def test_switched_off_and_bad_settings() -> None:
    sr = deg.upsample_bicubic(deg.degrade_bicubic(_phantom(), 2), 2)
    out = refine(sr, deg.degrade_bicubic(_phantom(), 2), 2, ConsistencySettings(steps=0))
    assert np.array_equal(out, sr) and out is not sr
    for bad in ({"steps": -1}, {"noise_threshold": 0.0}, {"noise_exponent": 0.0}, {"blur_sigma": -1.0}):
        with pytest.raises(ValueError, match="consistency"):
            ConsistencySettings(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        ConsistencySettings.from_params({"stepz": 3})


def test_noise_estimate_is_not_fooled_by_sharp_anatomy_borders() -> None:
    # A small clean slice: a bright brain-like disk with a sharp border on exact-zero air.
    yy, xx = np.mgrid[0:48, 0:40]
    texture = 0.5 + 0.2 * np.sin(xx / 1.3) * np.sin(yy / 1.7)  # fine 2-D detail, like cortex folds
    clean = np.where((yy - 24) ** 2 + (xx - 20) ** 2 < 18**2, texture, 0.0).astype(np.float32)[None]
    assert estimate_noise_sigma(clean) < 0.0005  # all blocks: ~0.0016, read as noise by the consistency weight
    noisy = deg.add_rician_noise(clean, 0.01, np.random.default_rng(2))
    assert estimate_noise_sigma(noisy) > 0.005


@pytest.mark.parametrize(("scale", "blur"), [(2, 0.0), (4, 0.0), (4, 0.8)])
def test_lr_space_iterations_equal_the_plain_back_projection(scale: int, blur: float) -> None:
    # The reference is the textbook loop x <- x + U(lr - D(x)) on HR-size images, clamped at the end.
    from medsr.ops import gaussian_blur_torch

    hr = _phantom(96)
    lr = deg.degrade_bicubic(deg.gaussian_blur(hr, blur), scale) if blur else deg.degrade_bicubic(hr, scale)
    start = deg.upsample_bicubic(deg.gaussian_blur(lr, 0.7), scale)
    x = torch.from_numpy(start)[None].double()
    target = torch.from_numpy(lr)[None].double()
    for _ in range(5):
        down = F.interpolate(gaussian_blur_torch(x, blur), size=target.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        x = x + F.interpolate(target - down, scale_factor=float(scale), mode="bicubic", align_corners=False)
    reference = x.clamp(0, 1)[0].float().numpy()
    fast = project_to_input(start, lr, scale, steps=5, blur_sigma=blur)
    inner = (slice(None), slice(3 * scale, -3 * scale), slice(3 * scale, -3 * scale))  # borders pad differently
    assert np.abs(fast[inner] - reference[inner]).max() < 2e-3


@pytest.mark.parametrize("blur", [0.0, 0.8])
def test_refine_takes_images_smaller_than_its_kernels(blur: float) -> None:
    lr = np.full((1, 1, 2), 0.5, np.float32)
    sr = np.full((1, 4, 8), 0.4, np.float32)
    out = refine(sr, lr, 4, ConsistencySettings(steps=5, noise_threshold=0.003, blur_sigma=blur), noise_sigma=0.0)
    assert out.shape == sr.shape and np.isfinite(out).all()
    assert abs(float(out.mean()) - 0.5) < 0.05  # pulled to the input's level
