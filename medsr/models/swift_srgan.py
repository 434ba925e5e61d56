"""Swift-SRGAN: SRGAN with depthwise-separable convolutions.

Seed: ``swift-srgan-chest-xray.md`` (NIH chest X-ray, 256 -> 1024). Paper: K. S. Krishnan and
K. S. Krishnan, "SwiftSRGAN - Rethinking Super-Resolution for Efficient and Real-time
Inference", ICICyTA 2021 (arXiv:2111.14320).

Same topology as ``srgan`` with every convolution replaced by depthwise (k x k) + pointwise
(1 x 1), biases dropped before BatchNorm, per-channel PReLU: 16 residual blocks, log2(scale)
x2 pixel-shuffle stages, separable 9x9 head and tail. The discriminator has the 8 separable
conv blocks of the seed (64, 64, 128, 128, 256, 256, 512, 512; strides 1, 2, ...; BN except
first; LeakyReLU 0.2) but global average pooling instead of the seed's AdaptiveAvgPool(6, 6)
+ dense(512*36 -> 1024), so any patch size works and it is ~18x smaller. Departures from the
seed code: output is a residual over bicubic instead of ``(tanh + 1) / 2``; the upsampler has
``log2(scale)`` stages (the seed's ``scale // 2`` is only right for 2 and 4); the discriminator
returns logits, not a sigmoid.

Parameter counts (1 channel in/out, counted by ``count_parameters``):

    generator x2 = 182,355
    generator x4 = 199,699
    discriminator = 1,063,051
"""

from __future__ import annotations

from collections.abc import Sequence

from medsr.models.architectures import register_architecture
from medsr.models.srgan import DISCRIMINATOR_FEATURES, SRGANDiscriminator, SRResNet


class SwiftSRGANDiscriminator(SRGANDiscriminator):
    """Swift-SRGAN discriminator: 8 separable conv blocks, global pooling, ``(N, 1)`` logits."""

    def __init__(self, in_channels: int = 1, features: Sequence[int] = DISCRIMINATOR_FEATURES,
                 hidden: int = 1024) -> None:
        super().__init__(in_channels, features=features, hidden=hidden, separable=True)


@register_architecture(
    "swift_srgan", seed="swift-srgan-chest-xray.md", discriminator=SwiftSRGANDiscriminator, loss_recipe="srgan",
    description="Swift-SRGAN: SRGAN with depthwise-separable convolutions, ~0.2M-parameter generator "
                "(Krishnan & Krishnan 2021).")
class SwiftSRGANGenerator(SRResNet):
    """Swift-SRGAN generator: SRResNet built from depthwise-separable convolutions."""

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16) -> None:
        super().__init__(scale, n_feats=n_feats, n_blocks=n_blocks, separable=True)
