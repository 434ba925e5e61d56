"""SRGAN: SRResNet generator and the SRGAN discriminator.

Seed: ``swift-srgan-chest-xray.md`` (NIH chest X-ray, 256 -> 1024, trains SRGAN and
Swift-SRGAN side by side). Paper: C. Ledig et al., "Photo-Realistic Single Image
Super-Resolution Using a Generative Adversarial Network", CVPR 2017 (arXiv:1609.04802).

Generator (SRResNet): Conv 9x9 + PReLU; 16 residual blocks (conv-BN-PReLU-conv-BN + skip);
conv-BN plus a skip from the first conv; ``log2(scale)`` x2 pixel-shuffle stages
(conv 64->256, PixelShuffle(2), PReLU); Conv 9x9 to one channel. PReLU is per channel, as in
Swift-SRGAN, so the two generators differ only in their convolutions. The output is a
residual over bicubic (``blocks`` module docstring), not the paper's tanh.

Discriminator: eight conv blocks (64, 64, 128, 128, 256, 256, 512, 512 channels, strides
1, 2, 1, 2, ...; BatchNorm except on the first; LeakyReLU 0.2), then *global average
pooling*, dense 1024, LeakyReLU, dense 1. The paper flattens a fixed 96x96 patch into the
dense layer; pooling first lets one discriminator judge any patch size. It returns logits
(no sigmoid): pair it with ``BCEWithLogitsLoss``.

Parameter counts (1 channel in/out, counted by ``count_parameters``):

    generator x2 = 1,380,033
    generator x4 = 1,527,809
    discriminator = 5,212,417
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import (ConvBlock, GlobalPoolClassifier, PixelShuffleUpsampler, ResidualBlock, SRGenerator,
                                 make_conv, shrink_init_)
from medsr.ops import bicubic_upsample

DISCRIMINATOR_FEATURES: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 512, 512)


class SRGANDiscriminator(nn.Module):
    """SRGAN discriminator with a global-pooling head: ``d(x) -> (N, 1)`` logits."""

    def __init__(self, in_channels: int = 1, features: Sequence[int] = DISCRIMINATOR_FEATURES, hidden: int = 1024,
                 separable: bool = False) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for idx, feat in enumerate(features):
            # No BatchNorm on the first block: normalising raw intensities would discard the
            # absolute brightness the discriminator needs (as in the paper).
            blocks.append(ConvBlock(channels, feat, 3, stride=1 + idx % 2, batch_norm=idx > 0, act="leaky",
                                    separable=separable))
            channels = feat
        self.features = nn.Sequential(*blocks)
        self.classifier = GlobalPoolClassifier(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_architecture(
    "srgan", seed="swift-srgan-chest-xray.md", discriminator=SRGANDiscriminator, loss_recipe="srgan",
    description="SRGAN: SRResNet generator (16 BN residual blocks) and VGG-style discriminator (Ledig et al. 2017).")
class SRResNet(SRGenerator):
    """SRResNet generator; ``separable=True`` gives the Swift-SRGAN generator."""

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16, separable: bool = False) -> None:
        super().__init__(scale)
        self.head = ConvBlock(1, n_feats, 9, batch_norm=False, act="prelu", separable=separable)
        self.body = nn.Sequential(*[ResidualBlock(n_feats, separable=separable) for _ in range(n_blocks)])
        self.body_tail = ConvBlock(n_feats, n_feats, 3, batch_norm=True, act=None, separable=separable)
        self.upsampler = PixelShuffleUpsampler(n_feats, self.scale, separable=separable)
        self.tail = shrink_init_(make_conv(n_feats, 1, 9, separable=separable))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(self.centered(x))
        feat = feat + self.body_tail(self.body(feat))
        return self.finish(bicubic_upsample(x, self.scale), self.tail(self.upsampler(feat)))
