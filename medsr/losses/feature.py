"""Feature terms: VGG19 perceptual loss from a weights file, or discriminator feature matching.

A perceptual loss compares features of a pretrained classifier; MedSR has no network access, so
the VGG19 weights come only from a file named in ``params.yaml`` (``train.feature_weights``).
Without that file there is no perceptual loss at all (a randomly initialised VGG is not
perceptual) and the ``feature`` term matches the discriminator's own intermediate features
instead (pix2pixHD); runs record which one was used (:data:`NO_PERCEPTUAL_NOTE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsr.losses.base import LossTerm
from medsr.losses.pixel import pixel_loss

NO_PERCEPTUAL_NOTE = "none (no weights file) -> feature matching"
PERCEPTUAL_CRITERIA: tuple[str, ...] = ("l1", "mse")


def feature_matching_loss(fake_features: Sequence[Tensor], real_features: Sequence[Tensor]) -> Tensor:
    """Mean over layers of the L1 distance between discriminator features (pix2pixHD).

    Real features are detached: only the generator is trained by this term.
    """
    if not fake_features or len(fake_features) != len(real_features):
        raise ValueError(f"feature lists differ: {len(fake_features)} fake vs {len(real_features)} real")
    terms = [F.l1_loss(fake, real.detach()) for fake, real in zip(fake_features, real_features, strict=True)]
    return torch.stack(terms).mean()


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

class FeatureLoss(LossTerm):
    """``feature``: distance between VGG19 features of SR and HR when ``weights_path`` names a
    VGG19 state_dict, else feature matching on the discriminator's features.

    Args:
        weight, reduction: as every term (reduction ``"mean"`` only).
        criterion: ``"l1"`` or ``"mse"``, the distance between VGG features (SRGAN: mse).
        weights_path: a VGG19 state_dict file, or None/empty for feature matching. Loaded only
            when ``weight > 0``: a switched-off term reads no file.

    Raises:
        ValueError: bad criterion, or a file that is not VGG19 feature weights;
            FileNotFoundError: ``weights_path`` does not exist. Called for feature matching
            without ``fake_features``/``real_features``: ValueError.
    """

    key = "feature"
    reductions = ("mean",)

    def __init__(self, weight: float = 1.0, reduction: str = "mean", criterion: str = "l1",
                 weights_path: str | Path | None = None) -> None:
        super().__init__(weight, reduction)
        if criterion not in PERCEPTUAL_CRITERIA:
            raise ValueError(f"loss term 'feature': criterion must be one of {', '.join(PERCEPTUAL_CRITERIA)}, "
                             f"got {criterion!r}")
        self.criterion = criterion
        configured = weights_path is not None and str(weights_path).strip() != ""
        self.source = str(weights_path) if configured else ""
        self.extractor = (FeatureExtractor.from_weights(self.source)
                          if configured and self.weight > 0.0 else None)

    @property
    def perceptual(self) -> bool:
        """True when it compares VGG19 features (a weights file was given), False for feature matching."""
        return self.extractor is not None

    @property
    def log_name(self) -> str:
        return "perceptual" if self.perceptual else "feature_matching"

    @property
    def note(self) -> str:
        """What the term computes, for the run's record."""
        return f"vgg19 perceptual ({self.source})" if self.perceptual else NO_PERCEPTUAL_NOTE

    def forward(self, sr: Tensor, hr: Tensor, *, fake_features: Sequence[Tensor] | None = None,
                real_features: Sequence[Tensor] | None = None, **_logits: Tensor | None) -> Tensor:
        if self.extractor is not None:
            with torch.no_grad():
                target = self.extractor(hr)
            return pixel_loss(self.extractor(sr), target, self.criterion)
        if fake_features is None or real_features is None:
            raise ValueError("loss term 'feature' has no perceptual weights file, so it needs discriminator "
                             "features for feature matching")
        return feature_matching_loss(fake_features, real_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, criterion={self.criterion!r}, source={self.source or 'feature matching'!r}"
