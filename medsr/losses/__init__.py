"""Training losses for every MedSR model: one term per module family, one constructor shape.

* :mod:`~medsr.losses.base`: :class:`LossTerm`, ``Term(weight=..., reduction=..., **options)``;
* :mod:`~medsr.losses.pixel`: ``pixel`` (L1 / MSE / log-MSE), ``tv``, ``gradient``;
* :mod:`~medsr.losses.ssim`: ``dssim`` (and the differentiable SSIM behind it);
* :mod:`~medsr.losses.adversarial`: ``adversarial``, the discriminator's loss and joint passes;
* :mod:`~medsr.losses.feature`: ``feature`` (VGG19 perceptual from a file, or feature matching);
* :mod:`~medsr.losses.recipes`: :data:`RECIPES` as config, :class:`GeneratorLoss` built from it.

All losses take contract batches: float tensors ``(N, 1, H, W)`` with values in ``[0, 1]``, and
every generator term is differentiable with respect to the super-resolved batch ``sr`` (tests
check that gradient reaches ``sr`` from each term: the Swift-SRGAN seed computed its adversarial
and perceptual terms under ``no_grad``, so they never trained the generator).
"""

from medsr.losses.adversarial import (AdversarialLoss, discriminate_jointly, discriminator_adversarial_loss,
                                      forward_with_features, generator_adversarial_loss)
from medsr.losses.base import REDUCTIONS, LossTerm
from medsr.losses.feature import (NO_PERCEPTUAL_NOTE, FeatureExtractor, FeatureLoss, feature_matching_loss,
                                  vgg19_feature_layers)
from medsr.losses.pixel import (PIXEL_KINDS, GradientLoss, PixelLoss, TotalVariationLoss, gradient_loss, pixel_loss,
                                total_variation_loss)
from medsr.losses.recipes import RECIPES, TERMS, GeneratorLoss, build_terms, recipe_config
from medsr.losses.ssim import DSSIMLoss, dssim_loss, ssim_torch

__all__ = [
    "NO_PERCEPTUAL_NOTE", "PIXEL_KINDS", "RECIPES", "REDUCTIONS", "TERMS", "AdversarialLoss", "DSSIMLoss",
    "FeatureExtractor", "FeatureLoss", "GeneratorLoss", "GradientLoss", "LossTerm", "PixelLoss", "TotalVariationLoss",
    "build_terms", "discriminate_jointly", "discriminator_adversarial_loss", "dssim_loss", "feature_matching_loss",
    "forward_with_features", "generator_adversarial_loss", "gradient_loss", "pixel_loss", "recipe_config",
    "ssim_torch", "total_variation_loss", "vgg19_feature_layers",
]
