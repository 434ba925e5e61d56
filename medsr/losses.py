"""Training losses for every MedSR model: pixel, adversarial, structural and feature terms.

All losses take contract batches: float tensors ``(N, 1, H, W)`` with values in ``[0, 1]``, and
every term is differentiable with respect to the super-resolved batch ``sr`` (tests check that
gradient reaches ``sr`` from each term: the Swift-SRGAN seed computed its adversarial and
perceptual terms under ``no_grad``, so they never trained the generator).

Feature terms. A perceptual loss compares features of a pretrained classifier; MedSR has no
network access, so the VGG19 weights come only from a file named in ``params.yaml``
(:func:`build_feature_loss`). Without that file there is no perceptual loss at all (a randomly
initialised VGG is not perceptual) and adversarial models use :func:`feature_matching_loss`
on the discriminator's own intermediate features instead; runs record which one was used
(:data:`NO_PERCEPTUAL_NOTE`).

Recipes (:data:`RECIPES`) name the published combinations:

* ``pixel``: L1 (or MSE) only, for ESPCN and the residual CNN, and the GAN warm-up;
* ``srgan`` (SRGAN / Swift-SRGAN): MSE + 0.006 feature + 1e-3 adversarial + 2e-8 TV (TV summed
  per image, as the weight was chosen for: :func:`total_variation_loss`);
* ``blimsr``: feature + 0.01 adversarial + 0.1 L1 + gradient + DSSIM (the BliMSR ensemble);
* ``cgan`` (BrainSR conditional GAN): L1 + 0.1 feature + 1e-3 adversarial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NO_PERCEPTUAL_NOTE = "none (no weights file) -> feature matching"

# --------------------------------------------------------------------------------------------
# Pixel and regularisation terms


PIXEL_KINDS: tuple[str, ...] = ("l1", "mse", "log_mse")
LOG_MSE_FLOOR = 1e-10  # keeps log finite for a patch predicted exactly; far below any real error


def pixel_loss(sr: Tensor, hr: Tensor, kind: str = "l1") -> Tensor:
    """Mean absolute (``l1``) or squared (``mse``) error, or ``log_mse``: the batch mean of each
    patch's ``10 log10(MSE)``, i.e. minus its PSNR.

    ``log_mse`` trains for what the benchmark reports, the mean per-image PSNR: each patch's
    gradient is scaled by 1/its MSE, so a flat, low-noise radiograph patch whose errors are 100x
    smaller than a brain slice's still counts as much in dB (with a plain mean the brain decides
    alone, and the x4 model never learned to denoise the radiograph).
    """
    if kind == "l1":
        return F.l1_loss(sr, hr)
    if kind == "mse":
        return F.mse_loss(sr, hr)
    if kind == "log_mse":
        per_patch = (sr - hr).pow(2).flatten(1).mean(dim=1)
        return (10.0 * torch.log10(per_patch + LOG_MSE_FLOOR)).mean()
    raise ValueError(f"unknown pixel loss {kind!r}; expected one of {', '.join(PIXEL_KINDS)}")


def total_variation_loss(x: Tensor) -> Tensor:
    """Anisotropic total variation *summed* over each image's pixels, averaged over the batch.

    SRGAN's TV weight 2e-8 belongs to a summed TV (intensities in [0, 1]): with a per-pixel
    mean the weighted term was ~1e-9, zero in effect. Summed, a 96x96 patch of typical medical
    texture gives ~2e-6..1e-5 next to an MSE of ~1e-3: the weak smoothness prior the paper meant.
    """
    per_image = ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(dim=1)
                 + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(dim=1))
    return per_image.mean()


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0


def sobel_gradients(x: Tensor) -> Tensor:
    """Horizontal and vertical Sobel responses of a 1-channel batch, ``(N, 2, H, W)``."""
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1).to(device=x.device, dtype=x.dtype)
    # Replicate padding: a zero border would add a fake edge around every patch.
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def gradient_loss(sr: Tensor, hr: Tensor) -> Tensor:
    """L1 distance between Sobel gradients: penalises blurred or displaced edges (BliMSR)."""
    return F.l1_loss(sobel_gradients(sr), sobel_gradients(hr))


# --------------------------------------------------------------------------------------------
# SSIM / DSSIM
#
# Written here rather than taken from scikit-image (numpy, no gradient) or torchmetrics (not a
# dependency): a loss must be differentiable. It reproduces scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
# data_range=1): skimage filters the whole image and then drops a 5-pixel border, which equals a
# "valid" convolution with the same normalised 11-tap Gaussian (tests compare the two).

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


# --------------------------------------------------------------------------------------------
# Adversarial terms (discriminators return logits of shape (N, 1))


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_adversarial_loss(real_logits: Tensor, fake_logits: Tensor, *, relativistic: bool = False) -> Tensor:
    """Discriminator loss: vanilla BCE (SRGAN) or relativistic average (ESRGAN)."""
    if relativistic:
        return 0.5 * (_bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0))
    return 0.5 * (_bce(real_logits, 1.0) + _bce(fake_logits, 0.0))


def generator_adversarial_loss(fake_logits: Tensor, real_logits: Tensor | None = None, *,
                               relativistic: bool = False) -> Tensor:
    """Generator loss: non-saturating BCE, or relativistic average (needs ``real_logits``).

    Real logits are detached: the generator step must not train the discriminator.
    """
    if relativistic:
        if real_logits is None:
            raise ValueError("the relativistic adversarial loss needs the discriminator's logits on real images")
        real = real_logits.detach()
        return 0.5 * (_bce(real - fake_logits.mean(), 0.0) + _bce(fake_logits - real.mean(), 1.0))
    return _bce(fake_logits, 1.0)


# --------------------------------------------------------------------------------------------
# Feature matching on discriminator features


def forward_with_features(module: nn.Module, *inputs: Tensor,
                          layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d,)) -> tuple[Tensor, list[Tensor]]:
    """Run ``module(*inputs)`` and also return the outputs of its inner layers of ``layer_types``.

    Forward hooks rather than a special method, so that any discriminator works unchanged.
    """
    features: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: features.append(out))
               for m in module.modules() if isinstance(m, layer_types)]
    if not handles:
        wanted = [t.__name__ for t in layer_types]
        raise ValueError(f"{type(module).__name__} has no {wanted} layers to match features on")
    try:
        output = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return output, features


def discriminate_jointly(discriminator: nn.Module, real: Tensor, fake: Tensor, *condition: Tensor,
                         with_features: bool = False) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Score real and fake images in *one* forward pass over their concatenation.

    Returns ``(real_logits, fake_logits, real_features, fake_features)``. One pass means every
    BatchNorm layer normalises real and fake with the same batch statistics (and updates its
    running statistics once): with two passes in train mode each half is normalised by its own
    mean and variance, so feature matching compares features on two different scales and the
    discriminator can tell real from fake by batch statistics alone. ``condition`` (the LR
    input of a conditional discriminator) is repeated for both halves.
    """
    n = real.shape[0]
    if fake.shape != real.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} batches differ in shape")
    inputs = (torch.cat([real, fake]), *(torch.cat([c, c]) for c in condition))
    if with_features:
        logits, features = forward_with_features(discriminator, *inputs)
    else:
        logits, features = discriminator(*inputs), []
    return logits[:n], logits[n:], [f[:n] for f in features], [f[n:] for f in features]


def feature_matching_loss(fake_features: Sequence[Tensor], real_features: Sequence[Tensor]) -> Tensor:
    """Mean over layers of the L1 distance between discriminator features (pix2pixHD).

    Real features are detached: only the generator is trained by this term.
    """
    if not fake_features or len(fake_features) != len(real_features):
        raise ValueError(f"feature lists differ: {len(fake_features)} fake vs {len(real_features)} real")
    terms = [F.l1_loss(fake, real.detach()) for fake, real in zip(fake_features, real_features, strict=True)]
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------
# VGG19 perceptual loss (weights from a file only)

# VGG19 configuration "E" (Simonyan & Zisserman); "M" is a 2x2 max-pool.
VGG19_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# ESRGAN's choice: features up to conv5_4 before its ReLU (indices 0..34 of vgg19.features).
VGG19_CONV5_4 = 35
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_feature_layers(num_layers: int = VGG19_CONV5_4) -> nn.Sequential:
    """The first ``num_layers`` modules of VGG19's ``features``, indexed as in torchvision."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG19_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = int(item)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    return nn.Sequential(*layers[:num_layers])


class FeatureExtractor(nn.Module):
    """Frozen VGG19 features of a 1-channel image (copied to RGB and ImageNet-normalised)."""

    def __init__(self, num_layers: int = VGG19_CONV5_4) -> None:
        super().__init__()
        self.features = vgg19_feature_layers(num_layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, weights_path: str | Path, num_layers: int = VGG19_CONV5_4) -> FeatureExtractor:
        """Load VGG19 weights from a state_dict file (torchvision's ``vgg19-*.pth`` or features only)."""
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual-loss weights {path} do not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors: give the file name, not a traceback
            raise ValueError(f"{path}: not a readable VGG19 state_dict ({type(exc).__name__}: {exc})") from None
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a VGG19 state_dict, found {type(state).__name__}")
        extractor = cls(num_layers)
        # Accept both torchvision's full model ("features.0.weight") and a bare features dict ("0.weight").
        prefix = "features." if any(str(k).startswith("features.") for k in state) else ""
        wanted = extractor.features.state_dict()
        selected = {k: state[prefix + k] for k in wanted if prefix + k in state}
        missing = sorted(set(wanted) - set(selected))
        if missing:
            more = " ..." if len(missing) > 4 else ""
            raise ValueError(f"{path}: not VGG19 feature weights; missing {missing[:4]}{more}")
        for key, tensor in selected.items():
            if tuple(tensor.shape) != tuple(wanted[key].shape):
                raise ValueError(f"{path}: {prefix}{key} has shape {tuple(tensor.shape)}, "
                                 f"VGG19 needs {tuple(wanted[key].shape)}")
        extractor.features.load_state_dict(selected)
        return extractor

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Always frozen: a caller's model.train() must not touch this module.
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        rgb = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.features((rgb - self.mean) / self.std)


class PerceptualLoss(nn.Module):
    """Distance between frozen VGG19 features of SR and HR (L1 or MSE)."""

    def __init__(self, extractor: FeatureExtractor, criterion: str = "l1", source: str = "") -> None:
        super().__init__()
        self.extractor = extractor
        self.criterion = criterion
        self.source = source

    def forward(self, sr: Tensor, hr: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.extractor(hr)
        return pixel_loss(self.extractor(sr), target, self.criterion)


def build_feature_loss(weights_path: str | None, *, criterion: str = "l1",
                       num_layers: int = VGG19_CONV5_4) -> PerceptualLoss | None:
    """A VGG19 perceptual loss from a weights file, or None when no file is configured.

    None means: use :func:`feature_matching_loss` and record :data:`NO_PERCEPTUAL_NOTE`.
    """
    if weights_path is None or str(weights_path).strip() == "":
        return None
    extractor = FeatureExtractor.from_weights(weights_path, num_layers)
    return PerceptualLoss(extractor, criterion=criterion, source=str(weights_path))


# --------------------------------------------------------------------------------------------
# Recipes: which terms a model's generator is trained with

TERMS = ("pixel", "feature", "adversarial", "tv", "gradient", "dssim")


@dataclass(frozen=True)
class LossRecipe:
    """A named weighted sum of generator loss terms."""

    name: str
    pixel: str  # one of PIXEL_KINDS
    weights: Mapping[str, float] = field(default_factory=dict)
    perceptual_criterion: str = "l1"

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise ValueError(f"recipe {self.name!r}: unknown loss terms {sorted(unknown)}; known: {TERMS}")

    @property
    def adversarial(self) -> bool:
        return self.weights.get("adversarial", 0.0) > 0.0

    def with_overrides(self, *, pixel: str | None = None, weights: Mapping[str, float] | None = None,
                       adversarial_weight: float | None = None) -> LossRecipe:
        merged = {**self.weights, **(weights or {})}
        if adversarial_weight is not None:
            merged["adversarial"] = float(adversarial_weight)
        return LossRecipe(self.name, pixel or self.pixel, merged, self.perceptual_criterion)


RECIPES: dict[str, LossRecipe] = {
    "pixel": LossRecipe("pixel", "l1", {"pixel": 1.0}),
    # Ledig et al. / Krishnan et al. (Swift-SRGAN): image MSE + 0.006 perception + 1e-3 adversarial + 2e-8 TV.
    "srgan": LossRecipe("srgan", "mse", {"pixel": 1.0, "feature": 0.006, "adversarial": 1e-3, "tv": 2e-8},
                        perceptual_criterion="mse"),
    # Dey et al. (BliMSR) ensemble loss.
    "blimsr": LossRecipe("blimsr", "l1", {"feature": 1.0, "adversarial": 0.01, "pixel": 0.1, "gradient": 1.0,
                                          "dssim": 1.0}),
    "cgan": LossRecipe("cgan", "l1", {"pixel": 1.0, "feature": 0.1, "adversarial": 1e-3}),
}


def recipe_for_model(name: str, *, adversarial: bool, conditional_discriminator: bool = False) -> str:
    """Default recipe name for a model (see :data:`RECIPES`)."""
    if not adversarial:
        return "pixel"
    if name == "blimsr":
        return "blimsr"
    if conditional_discriminator or name == "brainsr":
        return "cgan"
    return "srgan"


class GeneratorLoss(nn.Module):
    """Generator objective of a recipe; returns the total and each unweighted term by name.

    ``warmup=True`` gives the pixel term alone (weight 1), as SRGAN pre-trains SRResNet.
    The feature term is the perceptual loss when one is given, otherwise feature matching on
    ``fake_features``/``real_features`` from :func:`forward_with_features`.
    """

    def __init__(self, recipe: LossRecipe, perceptual: PerceptualLoss | None = None, *,
                 relativistic: bool = False) -> None:
        super().__init__()
        self.recipe = recipe
        self.perceptual = perceptual
        self.relativistic = relativistic

    @property
    def needs_discriminator_features(self) -> bool:
        return self.recipe.weights.get("feature", 0.0) > 0.0 and self.perceptual is None

    @property
    def feature_loss_note(self) -> str:
        if self.recipe.weights.get("feature", 0.0) <= 0.0:
            return "not used"
        if self.perceptual is None:
            return NO_PERCEPTUAL_NOTE
        return f"vgg19 perceptual ({self.perceptual.source})"

    def forward(self, sr: Tensor, hr: Tensor, *, fake_logits: Tensor | None = None,
                real_logits: Tensor | None = None, fake_features: Sequence[Tensor] | None = None,
                real_features: Sequence[Tensor] | None = None,
                warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        if warmup:
            term = pixel_loss(sr, hr, self.recipe.pixel)
            return term, {f"pixel_{self.recipe.pixel}": term}
        terms: dict[str, Tensor] = {}
        total = sr.new_zeros(())
        for name, weight in self.recipe.weights.items():
            if weight == 0.0:
                continue
            key, value = self._term(name, sr, hr, fake_logits, real_logits, fake_features, real_features)
            terms[key] = value
            total = total + weight * value
        return total, terms

    def _term(self, name: str, sr: Tensor, hr: Tensor, fake_logits: Tensor | None, real_logits: Tensor | None,
              fake_features: Sequence[Tensor] | None, real_features: Sequence[Tensor] | None) -> tuple[str, Tensor]:
        if name == "pixel":
            return f"pixel_{self.recipe.pixel}", pixel_loss(sr, hr, self.recipe.pixel)
        if name == "tv":
            return "tv", total_variation_loss(sr)
        if name == "gradient":
            return "gradient", gradient_loss(sr, hr)
        if name == "dssim":
            return "dssim", dssim_loss(sr, hr)
        if name == "adversarial":
            if fake_logits is None:
                raise ValueError(f"recipe {self.recipe.name!r} needs the discriminator's logits on SR images")
            return "adversarial", generator_adversarial_loss(fake_logits, real_logits, relativistic=self.relativistic)
        if name == "feature":
            if self.perceptual is not None:
                return "perceptual", self.perceptual(sr, hr)
            if fake_features is None or real_features is None:
                raise ValueError(f"recipe {self.recipe.name!r} has no perceptual weights file, so it needs "
                                 "discriminator features for feature matching")
            return "feature_matching", feature_matching_loss(fake_features, real_features)
        raise ValueError(f"unknown loss term {name!r}")


def _recipe_loss(recipe_name: str, sr: Tensor, hr: Tensor, fake_logits: Tensor, kwargs: dict[str, Any]
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    weights = kwargs.pop("weights", None)
    recipe = RECIPES[recipe_name].with_overrides(weights=weights)
    loss = GeneratorLoss(recipe, kwargs.pop("perceptual", None), relativistic=kwargs.pop("relativistic", False))
    return loss(sr, hr, fake_logits=fake_logits, **kwargs)


def blimsr_generator_loss(sr: Tensor, hr: Tensor, fake_logits: Tensor, *, real_logits: Tensor | None = None,
                          perceptual: PerceptualLoss | None = None, fake_features: Sequence[Tensor] | None = None,
                          real_features: Sequence[Tensor] | None = None, relativistic: bool = False,
                          weights: Mapping[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """BliMSR ensemble: perceptual-or-feature-matching + 0.01 adversarial + 0.1 L1 + gradient + DSSIM."""
    return _recipe_loss("blimsr", sr, hr, fake_logits, dict(
        real_logits=real_logits, perceptual=perceptual, fake_features=fake_features, real_features=real_features,
        relativistic=relativistic, weights=weights))


def srgan_generator_loss(sr: Tensor, hr: Tensor, fake_logits: Tensor, *, real_logits: Tensor | None = None,
                         perceptual: PerceptualLoss | None = None, fake_features: Sequence[Tensor] | None = None,
                         real_features: Sequence[Tensor] | None = None, relativistic: bool = False,
                         weights: Mapping[str, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """SRGAN / Swift-SRGAN: MSE + 0.006 perceptual-or-feature-matching + 1e-3 adversarial + 2e-8 TV."""
    return _recipe_loss("srgan", sr, hr, fake_logits, dict(
        real_logits=real_logits, perceptual=perceptual, fake_features=fake_features, real_features=real_features,
        relativistic=relativistic, weights=weights))


def is_finite(value: Tensor) -> bool:
    """True when a 0-d loss tensor is neither NaN nor infinite (one device sync)."""
    return math.isfinite(float(value.detach()))
