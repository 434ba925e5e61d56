"""PSNR/SSIM: one definition (1-channel, data_range 1, border crop, mean of per-image scores)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsr.data.pairs import PairItem, PairSet, write_pairs
from medsr.metrics import PSNR_CAP_DB, psnr, ssim
from medsr.training.trainer import score_track


def camera_pair(size: int = 128, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A real photograph as the reference and a noisy copy as the 'SR' image, both (1, H, W)."""
    hr = skimage.data.camera()[:size, 100:100 + size].astype(np.float32)[None] / 255.0
    rng = np.random.default_rng(seed)
    sr = np.clip(hr + rng.normal(0.0, noise, hr.shape), 0.0, 1.0).astype(np.float32)
    return sr, hr


def skimage_ssim(sr2d: np.ndarray, hr2d: np.ndarray) -> float:
    return structural_similarity(hr2d.astype(np.float64), sr2d.astype(np.float64), gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False, data_range=1.0)


@pytest.mark.parametrize("border", [0, 2, 4])
def test_psnr_and_ssim_match_scikit_image_on_the_cropped_image(border: int) -> None:
    sr, hr = camera_pair()
    crop = slice(border, hr.shape[-1] - border) if border else slice(None)
    expected_psnr = peak_signal_noise_ratio(hr[0][crop, crop].astype(np.float64), sr[0][crop, crop].astype(np.float64),
                                            data_range=1.0)
    expected_ssim = skimage_ssim(sr[0][crop, crop], hr[0][crop, crop])
    assert psnr(sr, hr, border=border) == pytest.approx(expected_psnr, abs=1e-9)
    assert ssim(sr, hr, border=border) == pytest.approx(expected_ssim, abs=1e-9)
    # Sanity of the fixture: noise of sigma 0.05 is about 26 dB, clearly not a perfect score.
    assert 24.0 < expected_psnr < 28.0
    assert 0.3 < expected_ssim < 0.95


def test_psnr_value_from_known_mse() -> None:
    hr = np.full((1, 32, 32), 0.5, np.float32)
    sr = hr + np.float32(0.1)  # MSE 0.01 -> PSNR 20 dB with data_range 1
    assert psnr(sr, hr, border=0) == pytest.approx(20.0, abs=1e-4)


def test_border_pixels_are_excluded() -> None:
    _, hr = camera_pair(size=64)
    sr = hr.copy()
    sr[:, :2, :] = 1.0 - sr[:, :2, :]  # ruin the two top rows only
    sr[:, :, -2:] = 0.0  # and the two right columns
    assert psnr(sr, hr, border=2) == PSNR_CAP_DB
    assert ssim(sr, hr, border=2) == pytest.approx(1.0)
    assert psnr(sr, hr, border=0) < 20.0
    # skimage's SSIM already ignores the outer 5 pixels (half its window) but the window still
    # reaches into the damaged rows.
    assert ssim(sr, hr, border=0) < 0.99
    assert psnr(sr, hr, border=1) < 20.0  # one pixel is not enough for this damage


def test_identical_images_are_capped_not_infinite() -> None:
    _, hr = camera_pair(size=32)
    assert psnr(hr, hr.copy(), border=0) == PSNR_CAP_DB
    tiny_error = hr.copy()
    tiny_error[0, 10, 10] += np.float32(1e-7)
    assert psnr(tiny_error, hr, border=0) == PSNR_CAP_DB  # about 157 dB: capped as well


def test_shape_errors_are_clear() -> None:
    sr, hr = camera_pair(size=32)
    with pytest.raises(ValueError, match="differs"):
        psnr(sr[:, :16], hr, border=0)
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        psnr(sr[0], hr[0], border=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(sr[:, :14, :14], hr[:, :14, :14], border=2)


def write_two_modality_pairs(folder, scale: int = 2) -> PairSet:
    """Four smooth synthetic images (two modalities) with antialiased bicubic LR versions."""
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32) / 48.0
    items = []
    for i in range(4):
        hr = 0.5 + 0.25 * np.sin(2 * np.pi * (1 + i) * xx) * np.cos(2 * np.pi * (2 + i) * yy)
        hr = np.clip(hr, 0, 1).astype(np.float32)[None]
        lr = F.interpolate(torch.from_numpy(hr)[None], scale_factor=1 / scale, mode="bicubic", antialias=True)
        lr = lr.clamp(0, 1)[0].numpy()
        items.append(PairItem(id=f"img{i}", modality="ct" if i < 2 else "mri", hr=hr, lr=lr))
    write_pairs(folder, items, scale=scale)
    return PairSet(folder)


def test_score_track_averages_per_image_scores_per_modality(tmp_path) -> None:
    pairs = write_two_modality_pairs(tmp_path / "val")

    def bicubic(lr: np.ndarray) -> np.ndarray:
        up = F.interpolate(torch.from_numpy(np.array(lr))[None], scale_factor=2, mode="bicubic", align_corners=False)
        return up.clamp(0, 1)[0].numpy()

    result = score_track(bicubic, pairs)
    per_image = [(psnr(bicubic(pairs.lr(i)), pairs.hr(i), border=2), ssim(bicubic(pairs.lr(i)), pairs.hr(i), border=2))
                 for i in range(len(pairs))]
    assert result["count"] == 4
    assert result["psnr"] == pytest.approx(np.mean([p for p, _ in per_image]))
    assert result["ssim"] == pytest.approx(np.mean([s for _, s in per_image]))
    assert set(result["per_modality"]) == {"ct", "mri"}
    assert result["per_modality"]["ct"]["psnr"] == pytest.approx(np.mean([per_image[0][0], per_image[1][0]]))
    assert result["per_modality"]["mri"]["count"] == 2
    # The images differ in difficulty, so the mean of per-image PSNRs is not the PSNR of the pooled pixels.
    pooled_sr = np.concatenate([bicubic(pairs.lr(i))[:, 2:-2, 2:-2].ravel() for i in range(4)])
    pooled_hr = np.concatenate([pairs.hr(i)[:, 2:-2, 2:-2].ravel() for i in range(4)])
    pooled = peak_signal_noise_ratio(pooled_hr.astype(np.float64), pooled_sr.astype(np.float64), data_range=1.0)
    assert abs(result["psnr"] - pooled) > 0.1
    # A worse predictor scores worse: the metric is not constant.
    def blurrier(lr: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(np.array(lr))[None], scale_factor=2, mode="nearest")[0].numpy()

    worse = score_track(blurrier, pairs)
    assert worse["psnr"] < result["psnr"] and worse["ssim"] < result["ssim"]
    subset = score_track(bicubic, pairs, [3])
    assert subset["count"] == 1 and list(subset["per_modality"]) == ["mri"]
    assert subset["psnr"] == pytest.approx(per_image[3][0])


def test_training_validation_and_the_benchmark_score_an_image_the_same_way(tmp_path) -> None:
    """Checkpoints are selected on score_track's numbers and judged on evaluate_images': one scoring function."""
    from medsr.evaluation import HeldOutImage, evaluate_images, summarize

    pairs = write_two_modality_pairs(tmp_path / "val")

    def nearest(lr: np.ndarray) -> np.ndarray:
        return F.interpolate(torch.from_numpy(np.array(lr))[None], scale_factor=2, mode="nearest")[0].numpy()

    def bicubic(lr: np.ndarray) -> np.ndarray:
        up = F.interpolate(torch.from_numpy(np.array(lr))[None], scale_factor=2, mode="bicubic", align_corners=False)
        return up.clamp(0, 1)[0].numpy()

    trained = score_track(nearest, pairs)
    images = [HeldOutImage(key=p["id"], modality=p["modality"], source=p["id"], track="clean", hr=pairs.hr(i),
                           lr=pairs.lr(i)) for i, p in enumerate(pairs.pairs)]
    rows = summarize(evaluate_images(lambda lr: {"bicubic": bicubic(lr), "nearest": nearest(lr)}, images, 2))
    for modality in ("ct", "mri"):
        row = next(r for r in rows if r["model"] == "nearest" and r["modality"] == modality)
        assert trained["per_modality"][modality]["psnr"] == pytest.approx(row["psnr"], abs=1e-4)
        assert trained["per_modality"][modality]["ssim"] == pytest.approx(row["ssim"], abs=1e-4)


def test_scoring_without_the_foreground_gives_the_same_whole_image_scores() -> None:
    from medsr.metrics import score_image

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64]
    hr = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 20**2, 0.6 + 0.2 * np.sin(xx / 2.0), 0.0).astype(np.float32)[None]
    sr = np.clip(hr + rng.normal(0, 0.02, hr.shape), 0, 1).astype(np.float32)
    full = score_image(sr, hr, scale=2, modality="mri")
    bare = score_image(sr, hr, scale=2, modality="mri", foreground=False)
    assert (bare["psnr"], bare["ssim"]) == (full["psnr"], full["ssim"])
    assert np.isfinite(full["psnr_fg"]) and np.isnan(bare["psnr_fg"]) and np.isnan(bare["ssim_fg"])


def test_score_track_uses_the_scale_as_border_and_checks_shapes(tmp_path) -> None:
    pairs = write_two_modality_pairs(tmp_path / "val")
    hr_by_lr = {pairs.lr(i).tobytes(): pairs.hr(i) for i in range(len(pairs))}

    def damaged_oracle(lr: np.ndarray) -> np.ndarray:
        sr = hr_by_lr[lr.tobytes()].copy()
        sr[:, :2, :] = 0.0  # damage only inside the 2-pixel border of a x2 set
        return sr

    result = score_track(damaged_oracle, pairs)
    assert result["psnr"] == PSNR_CAP_DB and result["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="does not match HR"):
        score_track(lambda lr: lr, pairs)


def test_foreground_scores_ignore_what_happens_in_the_background() -> None:
    from medsr.metrics import foreground_mask, psnr_in_mask, ssim_in_mask

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    disk = (yy - 64) ** 2 + (xx - 64) ** 2 < 40**2
    hr = np.where(disk, 0.5 + 0.2 * np.sin(xx / 3.0), 0.0).astype(np.float32)[None]
    noise = rng.normal(0, 0.03, hr.shape).astype(np.float32)
    noisy_everywhere = np.clip(hr + noise, 0, 1)
    clean_background = np.where(disk[None], noisy_everywhere, 0.0).astype(np.float32)
    mask = foreground_mask(hr, border=2)
    assert mask is not None and abs(mask.mean() - disk[2:-2, 2:-2].mean()) < 0.02
    # Zeroing the background lifts whole-image SSIM a lot and foreground SSIM not at all.
    assert ssim(clean_background, hr, border=2) - ssim(noisy_everywhere, hr, border=2) > 0.2
    assert ssim_in_mask(clean_background, hr, mask, border=2) == pytest.approx(
        ssim_in_mask(noisy_everywhere, hr, mask, border=2), abs=0.02)
    assert psnr_in_mask(clean_background, hr, mask, border=2) == pytest.approx(
        psnr_in_mask(noisy_everywhere, hr, mask, border=2), abs=0.3)
    assert foreground_mask(np.full((1, 32, 32), 0.4, np.float32), border=2) is None
