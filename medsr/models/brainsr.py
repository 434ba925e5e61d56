"""BrainSR: conditional GAN for brain MRI super-resolution and denoising, with curriculum.

Seed: ``brainsr-cgan-brain-mri.md`` (A. Muhammed, "BrainSR: Super-resolution and Image
Denoising Network for Brain Scans", v1.0.3, github.com/AmrAMHD/BrainSR; TensorFlow/Keras, no
paper). The seed describes the blocks but gives no layer sizes; the sizes below are ours.

Generator: pre-residual block (Conv 9x9 + PReLU); 16 residual propagations, each a residual
block conv-PReLU-conv + skip *without BatchNorm*; post-residual block (Conv 3x3) with a skip
from the pre-residual block; then an upsampling head per scale (x2 pixel-shuffle stages and a
Conv 9x9 to one channel). BatchNorm is left out because the curriculum changes the input
statistics (degradation strength, scale) during training, and running statistics collected on
the mild early stages would be wrong for the later ones. The generator owns one head for x2
and one for the target scale, sharing the trunk, so the curriculum can train x2 first and then
the target with the same trunk: ``forward(x, scale=None)`` (None = ``generator.scale``, the
target). At target scale 2 there is one head. The output is a residual over bicubic (``blocks``
module docstring).

Discriminator (conditional): it judges ``(hr_or_sr, lr)`` pairs, not images alone, so it can
penalise an SR image that is sharp but inconsistent with its own LR input. ``d(hr_or_sr, lr)``
upsamples ``lr`` bicubically (``F.interpolate``, align_corners=False) to the size of
``hr_or_sr`` and stacks it as a second channel, then runs 9 conv blocks (64, 64, 128, 128,
256, 256, 512, 512, 512 channels; strides 1, 2, ...; BN except first; LeakyReLU 0.2), global
average pooling, dense 1024, dense 1 -> ``(N, 1)`` logits. The seed's "9 deconvolution blocks"
are read as 9 down-sampling conv blocks (a discriminator reduces, it does not expand). The
seed's pre-trained VGG19/InceptionV3 feature extractors are not part of this module: weights
cannot be downloaded here, and feature losses belong to ``medsr.losses``.

Curriculum: :func:`curriculum_stage` maps training progress to the scale and degradation
strength to train on; the trainer applies it.

Parameter counts (1 channel in/out, counted by ``count_parameters``; x4 includes the x2 head):

    generator x2 = 1,377,921
    generator x4 = 1,678,658
    discriminator = 7,573,313
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import (ConvBlock, GlobalPoolClassifier, PixelShuffleUpsampler, ResidualBlock, SRGenerator,
                                 check_scale, conv2d, shrink_init_)
from medsr.ops import bicubic_resize, bicubic_upsample

DISCRIMINATOR_FEATURES: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 512, 512, 512)

# Below this fraction of training the curriculum stays at x2; above it, the target scale.
CURRICULUM_SCALE_SWITCH = 0.5
# Degradation strength rises linearly from 0 to 1 over [0, RAMP_END], then holds at 1 so the
# last part of training consolidates on the hardest task.
CURRICULUM_RAMP_END = 0.8


def curriculum_stage(progress: float, target_scale: int) -> dict[str, float | int]:
    """Training stage for ``progress`` in [0, 1] (fraction of training done).

    Returns ``{"scale": 2 or target_scale, "degradation_strength": s in [0, 1]}``. Both are
    non-decreasing in ``progress``: the scale is 2 until ``CURRICULUM_SCALE_SWITCH`` then the
    target; the strength ramps from 0 (mild: downsampling only) to 1 (the strongest blur and
    noise the trainer's degradation allows) by ``CURRICULUM_RAMP_END``. At ``progress == 1``
    it is always ``{"scale": target_scale, "degradation_strength": 1.0}``.
    """
    target = check_scale(target_scale)
    progress = float(progress)
    if not math.isfinite(progress) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    scale = 2 if progress < CURRICULUM_SCALE_SWITCH else target
    strength = min(1.0, progress / CURRICULUM_RAMP_END)
    return {"scale": scale, "degradation_strength": strength}


class BrainSRDiscriminator(nn.Module):
    """Conditional discriminator: ``d(hr_or_sr, lr) -> (N, 1)`` logits."""

    def __init__(self, features: Sequence[int] = DISCRIMINATOR_FEATURES, hidden: int = 1024) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 2  # the judged image and its bicubically upsampled LR condition
        for idx, feat in enumerate(features):
            blocks.append(ConvBlock(channels, feat, 3, stride=1 + idx % 2, batch_norm=idx > 0, act="leaky"))
            channels = feat
        self.features = nn.Sequential(*blocks)
        self.classifier = GlobalPoolClassifier(channels, hidden)

    def forward(self, hr_or_sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        if lr.ndim != 4 or hr_or_sr.ndim != 4 or lr.shape[0] != hr_or_sr.shape[0]:
            raise ValueError(f"expected (N, 1, H, W) and (N, 1, h, w), got {tuple(hr_or_sr.shape)} and {tuple(lr.shape)}")
        condition = bicubic_resize(lr, hr_or_sr.shape[-2:])
        return self.classifier(self.features(torch.cat([hr_or_sr, condition], dim=1)))


@register_architecture(
    "brainsr", seed="brainsr-cgan-brain-mri.md", discriminator=BrainSRDiscriminator, conditional_discriminator=True,
    loss_recipe="cgan", curriculum=curriculum_stage,
    description="BrainSR: residual cGAN for brain MRI SR and denoising; discriminator conditioned on the LR input; "
                "curriculum from x2/mild to target/strong.")
class BrainSRGenerator(SRGenerator):
    """BrainSR generator with a shared trunk and one upsampling head per scale (2 and target)."""

    def __init__(self, scale: int = 4, n_feats: int = 64, n_blocks: int = 16) -> None:
        super().__init__(scale)
        self.pre = nn.Sequential(conv2d(1, n_feats, 9), nn.PReLU(n_feats))
        self.body = nn.Sequential(*[ResidualBlock(n_feats, batch_norm=False) for _ in range(n_blocks)])
        self.post = conv2d(n_feats, n_feats, 3)
        self.heads = nn.ModuleDict({
            str(s): nn.Sequential(PixelShuffleUpsampler(n_feats, s), shrink_init_(conv2d(n_feats, 1, 9)))
            for s in sorted({2, self.scale})
        })

    @property
    def scales(self) -> tuple[int, ...]:
        """Scales this generator can produce at forward time."""
        return tuple(int(k) for k in self.heads)

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        s = self.scale if scale is None else int(scale)
        if str(s) not in self.heads:
            raise ValueError(f"BrainSR generator built for scale {self.scale} has heads for {self.scales}, not {s}")
        feat = self.pre(self.centered(x))
        feat = feat + self.post(self.body(feat))
        return self.finish(bicubic_upsample(x, s), self.heads[str(s)](feat))
