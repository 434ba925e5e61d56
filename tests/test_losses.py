"""Losses: values against references, and gradient reaching the SR batch from every term."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from medsr.losses import (
    NO_PERCEPTUAL_NOTE,
    RECIPES,
    TERMS,
    FeatureExtractor,
    FeatureLoss,
    GeneratorLoss,
    LossTerm,
    discriminator_adversarial_loss,
    dssim_loss,
    feature_matching_loss,
    forward_with_features,
    generator_adversarial_loss,
    gradient_loss,
    pixel_loss,
    recipe_config,
    ssim_torch,
    total_variation_loss,
    vgg19_feature_layers,
)


def camera_batch(size: int = 48, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(sr, hr): a photograph crop (N=2, two different crops) and a noisy copy, float32 (2, 1, H, W)."""
    image = skimage.data.camera().astype(np.float32) / 255.0
    hr = np.stack([image[100:100 + size, 200:200 + size], image[300:300 + size, 50:50 + size]])[:, None]
    rng = np.random.default_rng(0)
    sr = np.clip(hr + rng.normal(0, noise, hr.shape), 0, 1).astype(np.float32)
    return torch.from_numpy(sr), torch.from_numpy(hr)


def tiny_discriminator() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 8, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))


def grad_to(term: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
    assert term.requires_grad, "term is detached from the SR batch"
    (gradient,) = torch.autograd.grad(term, sr, retain_graph=True)
    return gradient


def test_pixel_losses() -> None:
    sr, hr = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)
    assert pixel_loss(sr, hr, "l1").item() == pytest.approx(0.5)
    assert pixel_loss(sr, hr, "mse").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown pixel loss"):
        pixel_loss(sr, hr, "l3")


def test_ssim_torch_matches_scikit_image() -> None:
    sr, hr = camera_batch()
    expected = np.mean([
        structural_similarity(hr[i, 0].double().numpy(), sr[i, 0].double().numpy(), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for i in range(2)
    ])
    assert 0.3 < expected < 0.95
    assert ssim_torch(sr, hr).item() == pytest.approx(expected, abs=2e-5)
    assert ssim_torch(hr, hr).item() == pytest.approx(1.0, abs=1e-6)
    assert dssim_loss(hr, hr).item() == pytest.approx(0.0, abs=1e-6)
    assert dssim_loss(sr, hr).item() == pytest.approx((1 - expected) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_torch(sr[..., :10, :10], hr[..., :10, :10])


def test_tv_term_is_summed_per_image_so_the_srgan_weight_counts() -> None:
    # SRGAN's weight 2e-8 was chosen for a TV summed over the image: on a 96x96 crop the weighted
    # term is a small but real fraction of the MSE term. Averaged per pixel (the old scale) it was
    # ~1e-9, about a millionth of the MSE: zero in effect.
    sr, hr = camera_batch(size=96, noise=0.03)
    weighted_tv = RECIPES["srgan"]["tv"]["weight"] * total_variation_loss(sr).item()
    mse = pixel_loss(sr, hr, "mse").item()
    assert 1e-3 < weighted_tv / mse < 0.5
    # Per image: the value does not depend on the batch size, and grows with the image's area.
    assert total_variation_loss(sr[:1]).item() == pytest.approx(total_variation_loss(sr[:1].repeat(3, 1, 1, 1)).item())
    tiled = torch.cat([sr[:1], sr[:1]], dim=-1)
    assert total_variation_loss(tiled).item() > 1.9 * total_variation_loss(sr[:1]).item()


def test_total_variation_and_gradient_losses() -> None:
    assert total_variation_loss(torch.full((1, 1, 8, 8), 0.3)).item() == 0.0
    checkerboard = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)).remainder(2).float().view(1, 1, 8, 8)
    # Summed per image: 8 rows x 7 vertical and 8 columns x 7 horizontal unit differences.
    assert total_variation_loss(checkerboard).item() == pytest.approx(112.0)
    assert total_variation_loss(torch.cat([checkerboard, torch.zeros_like(checkerboard)])).item() == pytest.approx(56.0)
    _, hr = camera_batch()
    # Gradients ignore a constant offset but see blur.
    assert gradient_loss(hr + 0.1, hr).item() == pytest.approx(0.0, abs=1e-6)
    blurred = F.avg_pool2d(hr, 3, stride=1, padding=1, count_include_pad=False)
    assert gradient_loss(blurred, hr).item() > 0.005
    # A vertical unit step: normalised Sobel response 1 in the two columns beside the step, only
    # in the horizontal channel: 2 columns x 6 rows over 2 channels x 36 pixels.
    step = torch.zeros(1, 1, 6, 6)
    step[..., 3:] = 1.0
    assert gradient_loss(step, torch.zeros_like(step)).item() == pytest.approx(12 / 72)


def test_adversarial_losses() -> None:
    confident_real, confident_fake = torch.full((4, 1), 20.0), torch.full((4, 1), -20.0)
    assert discriminator_adversarial_loss(confident_real, confident_fake).item() == pytest.approx(0.0, abs=1e-6)
    assert discriminator_adversarial_loss(confident_fake, confident_real).item() == pytest.approx(20.0, abs=1e-3)
    zero = torch.zeros(4, 1)
    assert generator_adversarial_loss(zero).item() == pytest.approx(np.log(2))
    real, fake = torch.randn(4, 1), torch.randn(4, 1)
    # Relativistic losses depend only on the difference between real and fake logits.
    shifted = discriminator_adversarial_loss(real + 3, fake + 3, relativistic=True)
    unshifted = discriminator_adversarial_loss(real, fake, relativistic=True)
    assert shifted.item() == pytest.approx(unshifted.item(), abs=1e-6)
    assert discriminator_adversarial_loss(real + 3, fake + 3).item() != pytest.approx(
        discriminator_adversarial_loss(real, fake).item(), abs=1e-3)
    with pytest.raises(ValueError, match="real images"):
        generator_adversarial_loss(fake, relativistic=True)
    real.requires_grad_(True)
    fake.requires_grad_(True)
    generator_adversarial_loss(fake, real, relativistic=True).backward()
    assert real.grad is None and fake.grad.abs().sum() > 0  # the generator step never trains D


def test_feature_matching_uses_discriminator_features() -> None:
    sr, hr = camera_batch(size=32)
    sr.requires_grad_(True)
    discriminator = tiny_discriminator()
    logits, fake_features = forward_with_features(discriminator, sr)
    assert logits.shape == (2, 1) and [f.shape[1] for f in fake_features] == [4, 8]
    with torch.no_grad():
        _, real_features = forward_with_features(discriminator, hr)
    loss = feature_matching_loss(fake_features, real_features)
    assert loss.item() > 0 and grad_to(loss, sr).abs().sum() > 0
    _, same = forward_with_features(discriminator, hr)
    assert feature_matching_loss(same, real_features).item() == 0.0
    assert not discriminator[0]._forward_hooks  # hooks are removed after the call
    with pytest.raises(ValueError, match="no"):
        forward_with_features(nn.Identity(), sr)


def save_vgg19_like_torchvision(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict shaped like torchvision's vgg19 file: 'features.N.*' plus classifier keys."""
    torch.manual_seed(seed)
    features = vgg19_feature_layers(37)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # extra keys are ignored
    torch.save(state, path)
    return state


def test_feature_term_without_a_weights_file_matches_discriminator_features() -> None:
    for path in (None, ""):
        term = FeatureLoss(weights_path=path)
        assert not term.perceptual and term.log_name == "feature_matching" and term.note == NO_PERCEPTUAL_NOTE


def test_vgg19_loads_only_from_a_file_and_passes_gradient(tmp_path) -> None:
    path = tmp_path / "vgg19.pth"
    state = save_vgg19_like_torchvision(path)
    perceptual = FeatureLoss(weights_path=str(path))
    assert perceptual.perceptual and perceptual.log_name == "perceptual"
    extractor = perceptual.extractor
    assert extractor is not None
    assert torch.equal(extractor.features[34].weight, state["features.34.weight"])  # conv5_4 loaded
    assert len(extractor.features) == 35 and isinstance(extractor.features[-1], nn.Conv2d)
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training  # stays frozen in eval mode
    # A bare features state_dict ("0.weight") loads too.
    bare = tmp_path / "bare.pt"
    torch.save({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}, bare)
    assert torch.equal(FeatureExtractor.from_weights(bare).features[0].weight, state["features.0.weight"])

    sr, hr = camera_batch(size=32)
    sr.requires_grad_(True)
    loss = perceptual(sr, hr)
    assert loss.item() > 0 and grad_to(loss, sr).abs().sum() > 0
    assert perceptual(hr, hr).item() == 0.0
    # 1-channel input is replicated to RGB and ImageNet-normalised, so it equals the RGB path.
    rgb = hr.expand(-1, 3, -1, -1)
    assert torch.allclose(extractor(hr), extractor(rgb))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(extractor(hr), extractor.features((rgb - mean) / std))


def test_vgg19_weight_file_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="do not exist"):
        FeatureLoss(weights_path=str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth: not a readable VGG19 state_dict"):
        FeatureLoss(weights_path=str(corrupt))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="not VGG19 feature weights"):
        FeatureLoss(weights_path=str(other))
    wrong_shape = tmp_path / "wrong.pth"
    state = {f"features.{k}": v for k, v in vgg19_feature_layers(35).state_dict().items()}
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match="features.0.weight has shape"):
        FeatureLoss(weights_path=str(wrong_shape))


def test_blimsr_loss_every_term_reaches_the_sr_batch() -> None:
    sr, hr = camera_batch(size=32)
    sr.requires_grad_(True)
    discriminator = tiny_discriminator()
    fake_logits, fake_features = forward_with_features(discriminator, sr)
    with torch.no_grad():
        real_logits, real_features = forward_with_features(discriminator, hr)
    blimsr = GeneratorLoss.from_config(recipe_config("blimsr"), name="blimsr")
    total, terms = blimsr(sr, hr, fake_logits=fake_logits, real_logits=real_logits, fake_features=fake_features,
                          real_features=real_features)
    assert set(terms) == {"feature_matching", "adversarial", "pixel_l1", "gradient", "dssim"}
    for name, term in terms.items():
        assert grad_to(term, sr).abs().sum() > 0, f"no gradient from {name}"
    expected = (terms["feature_matching"] + 0.01 * terms["adversarial"] + 0.1 * terms["pixel_l1"]
                + terms["gradient"] + terms["dssim"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="feature matching"):
        blimsr(sr, hr, fake_logits=fake_logits)


def test_srgan_adversarial_and_perceptual_terms_carry_gradient(tmp_path) -> None:
    path = tmp_path / "vgg19.pth"
    save_vgg19_like_torchvision(path)
    srgan = GeneratorLoss.from_config(recipe_config("srgan"), name="srgan", feature_weights=str(path))
    assert srgan.feature_loss_note == f"vgg19 perceptual ({path})"
    sr, hr = camera_batch(size=32)
    sr.requires_grad_(True)
    fake_logits = tiny_discriminator()(sr)
    total, terms = srgan(sr, hr, fake_logits=fake_logits)
    assert set(terms) == {"pixel_mse", "perceptual", "adversarial", "tv"}
    for name in ("perceptual", "adversarial"):
        assert grad_to(terms[name], sr).abs().sum() > 0, f"no gradient from {name}"
    assert grad_to(total, sr).abs().sum() > 0


def test_generator_loss_recipes_and_warmup() -> None:
    from medsr.models import model_spec

    assert [model_spec(m).loss_recipe for m in ("espcn", "swift_srgan", "blimsr", "brainsr", "residual_cnn")] == [
        "pixel", "srgan", "blimsr", "cgan", "pixel"]
    loss = GeneratorLoss.from_config(RECIPES["srgan"], name="srgan")
    assert loss.needs_discriminator_features and loss.feature_loss_note == NO_PERCEPTUAL_NOTE
    sr, hr = camera_batch(size=16)
    total, terms = loss(sr, hr, warmup=True)
    assert list(terms) == ["pixel_mse"] and total.item() == pytest.approx(F.mse_loss(sr, hr).item())
    assert GeneratorLoss.from_config(RECIPES["pixel"]).feature_loss_note == "not used"
    stronger = recipe_config("srgan", {"adversarial": {"weight": 0.5}, "pixel": {"kind": "l1"}})
    assert stronger["adversarial"] == {"weight": 0.5} and stronger["pixel"] == {"kind": "l1", "weight": 1.0}
    assert list(stronger) == list(RECIPES["srgan"])  # the summation order is the recipe's
    with pytest.raises(ValueError, match="unknown loss term 'style'; known: pixel, feature"):
        GeneratorLoss.from_config(recipe_config("pixel", {"style": {"weight": 1.0}}))
    with pytest.raises(ValueError, match="unknown loss recipe 'esrgan'; known: pixel, srgan, blimsr, cgan"):
        recipe_config("esrgan")


# The published weights, written out: a recipe built from config must reproduce them exactly.
PUBLISHED = {
    "pixel": [("pixel_l1", 1.0)],
    "srgan": [("pixel_mse", 1.0), ("feature_matching", 0.006), ("adversarial", 1e-3), ("tv", 2e-8)],
    "blimsr": [("feature_matching", 1.0), ("adversarial", 0.01), ("pixel_l1", 0.1), ("gradient", 1.0), ("dssim", 1.0)],
    "cgan": [("pixel_l1", 1.0), ("feature_matching", 0.1), ("adversarial", 1e-3)],
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_is_built_from_config_with_its_published_weights(name: str) -> None:
    loss = GeneratorLoss.from_config(recipe_config(name), name=name)
    assert [(t.log_name, t.weight) for t in loss.terms] == PUBLISHED[name]
    sr, hr = camera_batch(size=32)
    discriminator = tiny_discriminator()
    fake_logits, fake_features = forward_with_features(discriminator, sr)
    real_logits, real_features = forward_with_features(discriminator, hr)
    total, terms = loss(sr, hr, fake_logits=fake_logits, real_logits=real_logits, fake_features=fake_features,
                        real_features=real_features)
    assert list(terms) == [log_name for log_name, _ in PUBLISHED[name]]
    # The weighted sum, in the recipe's order, exactly as the loop before the refactor computed it.
    expected = sr.new_zeros(())
    for log_name, weight in PUBLISHED[name]:
        expected = expected + weight * terms[log_name]
    assert total.item() == expected.item()


@pytest.mark.parametrize("key", list(TERMS))
def test_every_term_is_constructed_the_same_way_and_validates_it(key: str) -> None:
    term_class = TERMS[key]
    term = term_class(weight=0.5, reduction="mean")
    assert isinstance(term, LossTerm) and term.key == key and term.weight == 0.5 and term.reduction == "mean"
    assert term_class().weight == 1.0 and term_class().reduction == "mean"
    for weight in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=rf"loss term '{key}': weight must be a finite number >= 0"):
            term_class(weight=weight)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"loss term '{key}': reduction must be one of"):
        term_class(reduction="none")


def test_sum_reduction_where_a_term_offers_it() -> None:
    sr, hr = camera_batch(size=16)
    n = sr.numel()
    assert TERMS["pixel"](reduction="sum")(sr, hr).item() == pytest.approx(F.l1_loss(sr, hr).item() * n, rel=1e-5)
    assert TERMS["tv"](reduction="sum")(sr, hr).item() == pytest.approx(2 * total_variation_loss(sr).item(), rel=1e-6)
    assert "sum" not in TERMS["dssim"].reductions and "sum" not in TERMS["adversarial"].reductions
    with pytest.raises(ValueError, match="loss term 'pixel': kind must be one of l1, mse, log_mse"):
        TERMS["pixel"](kind="l2")


def test_log_mse_is_minus_the_mean_patch_psnr_and_weighs_patches_by_their_error() -> None:
    import math

    import torch

    from medsr.losses import pixel_loss

    hr = torch.zeros(2, 1, 8, 8)
    sr = hr.clone()
    sr[0] += 0.1   # MSE 1e-2: PSNR 20 dB
    sr[1] += 0.001  # MSE 1e-6: PSNR 60 dB
    assert pixel_loss(sr, hr, "log_mse").item() == pytest.approx(-(20 + 60) / 2, abs=1e-3)
    sr.requires_grad_(True)
    pixel_loss(sr, hr, "log_mse").backward()
    per_patch = sr.grad.abs().flatten(1).sum(dim=1)
    # d(10 log10 MSE)/d sr = 20 / ln10 * err / (n * MSE): the small-error patch pulls 100x harder per unit error.
    assert per_patch[1] / per_patch[0] == pytest.approx(100.0, rel=1e-3)
    assert math.isfinite(pixel_loss(hr, hr, "log_mse").item())
    with pytest.raises(ValueError, match="log_mse"):
        pixel_loss(sr, hr, "l2")
