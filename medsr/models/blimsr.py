"""BliMSR: attention GAN for blind-degradation medical super-resolution.

Seed: ``blimsr-blind-degradation-ct.md`` (lung CT). Paper: S. Dey et al., "BliMSR: Blind
Degradation Modelling for Generating High-Resolution Medical Images", MIUA 2023, LNCS 14122,
pp. 64-78 (doi:10.1007/978-3-031-48593-0_5). Code: github.com/Samiran-Dey/BliMSR. The
attention is MHCA from M.-I. Georgescu et al., "Multimodal Multi-Head Convolutional Attention
with Various Kernel Sizes for Medical Image Super-Resolution", WACV 2023.

Generator: Conv 3x3 (1 -> F); ``n_groups`` residual groups, each ``n_blocks`` residual
multi-head attention blocks (conv-ReLU-conv, then MHCA, plus skip), a closing Conv 3x3 (added
to the reference, RCAN-style, see ``ResidualGroup``) and a group skip; Conv 1x1;
global skip by concatenating the shallow features (2F channels, as in the reference code);
``log2(scale)`` x2 pixel-shuffle stages (the first from 2F channels, no activation, as in the
reference); Conv 1x1 to one channel. MHCA gates the features with
``sigmoid(head_1x1(x) + head_3x3(x) + head_5x5(x))``, each head a conv (F -> F/reduction),
ReLU, conv (F/reduction -> F). The reference restores the size with an unpadded conv and a
transposed conv; here both convs of a head are 'same'-padded (identical parameter count), so
inputs smaller than 5 pixels also work. The reference ends in a sigmoid; here the output is a
residual over bicubic (``blocks`` module docstring). The last conv of every residual branch is
initialised at 0.1x so the 128-block trunk starts near identity. The default (8 groups x 16
blocks x 64 features, reduction 4) is the reference generator's size (19,107,073 there at x4,
plus 295,424 for the 8 group convs); ``SAMPLE_OPTIONS`` is a small variant for the sample
pipeline and tests.

Discriminator: residual blocks with spectral normalisation on every conv (conv-LeakyReLU-conv
plus a parameter-free shortcut: bicubic downsampling where the block strides, channel
repetition where it widens, as in the reference), channels F, F, 2F, 2F, 4F, 4F, 8F, 8F with
strides 1, 1, 2, 1, 2, 1, 2, 1, then *global average pooling* and a spectral-normalised dense
layer to one logit. The reference flattens a fixed 512x512 input into a 2,097,152-input
dense layer; pooling makes any patch size work. Spectral norm replaces BatchNorm: it bounds
the discriminator's Lipschitz constant, which is the stability argument of the paper.

Parameter counts (1 channel in/out, counted by ``count_parameters``):

    generator x2 = 19,254,785
    generator x4 = 19,402,497
    generator x2 sample = 239,905
    generator x4 sample = 276,897
    discriminator = 10,916,609
    discriminator sample = 683,201
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import SRGenerator, conv2d, shrink_init_, spectral_conv2d, spectral_linear
from medsr.ops import bicubic_resize, bicubic_upsample

# Small variant for the embedded sample data and fast tests.
SAMPLE_OPTIONS: dict[str, int] = {"n_groups": 2, "n_blocks": 2, "n_feats": 32}
DISCRIMINATOR_SAMPLE_OPTIONS: dict[str, int] = {"n_feats": 16}


class MHCA(nn.Module):
    """Multi-head convolutional channel attention: x * sigmoid(sum of 1x1, 3x3, 5x5 heads)."""

    def __init__(self, n_feats: int, reduction: int = 4, kernel_sizes: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        hidden = max(1, n_feats // reduction)
        self.heads = nn.ModuleList(
            nn.Sequential(conv2d(n_feats, hidden, k), nn.ReLU(inplace=True), conv2d(hidden, n_feats, k))
            for k in kernel_sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.heads[0](x)
        for head in self.heads[1:]:
            logits = logits + head(x)
        return x * torch.sigmoid(logits)


class AttentionBlock(nn.Module):
    """Residual multi-head attention block (RMHAB): x + MHCA(conv-ReLU-conv(x))."""

    def __init__(self, n_feats: int, reduction: int = 4) -> None:
        super().__init__()
        # 0.1x init of the branch's last conv (ESRGAN's "smaller initialisation"): with 128
        # unnormalised residual blocks at default init the trunk's activations grow with depth and
        # the untrained generator outputs values far outside [0, 1].
        self.body = nn.Sequential(conv2d(n_feats, n_feats, 3), nn.ReLU(inplace=True),
                                  shrink_init_(conv2d(n_feats, n_feats, 3)), MHCA(n_feats, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualGroup(nn.Module):
    """``n_blocks`` attention blocks and a 3x3 conv, with a skip around the group (RCAN).

    The reference adds the group input to the output of a chain of residual blocks, which is
    itself ~input at initialisation, so every group doubles the features (x256 over 8 groups).
    The closing conv, initialised at 0.1x, makes the group a small perturbation of identity.
    """

    def __init__(self, n_feats: int, n_blocks: int, reduction: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(*[AttentionBlock(n_feats, reduction) for _ in range(n_blocks)],
                                  shrink_init_(conv2d(n_feats, n_feats, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SNResidualBlock(nn.Module):
    """Spectral-normalised conv-LeakyReLU-conv with a parameter-free shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % in_channels:
            raise ValueError("the parameter-free shortcut repeats channels: out must be a multiple of in")
        self.repeat = out_channels // in_channels
        self.stride = stride
        self.conv1 = spectral_conv2d(in_channels, out_channels, 3, stride=stride)
        self.act = nn.LeakyReLU(0.2)
        self.conv2 = spectral_conv2d(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.act(self.conv1(x)))
        # Resize to the conv output's own size: a fixed 0.5 factor is off by one on odd sizes.
        shortcut = bicubic_resize(x, out.shape[-2:]) if self.stride != 1 else x
        if self.repeat > 1:
            shortcut = shortcut.repeat(1, self.repeat, 1, 1)
        return out + shortcut


class BliMSRDiscriminator(nn.Module):
    """Spectral-normalised residual discriminator with global pooling: ``d(x) -> (N, 1)`` logits."""

    def __init__(self, n_feats: int = 64) -> None:
        super().__init__()
        f = n_feats
        self.head = spectral_conv2d(1, f, 3)
        plan = [(f, f, 1), (f, 2 * f, 2), (2 * f, 2 * f, 1), (2 * f, 4 * f, 2), (4 * f, 4 * f, 1), (4 * f, 8 * f, 2),
                (8 * f, 8 * f, 1)]
        self.act = nn.LeakyReLU(0.2)
        self.blocks = nn.ModuleList(SNResidualBlock(i, o, s) for i, o, s in plan)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = spectral_linear(8 * f, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        for block in self.blocks:
            x = block(self.act(x))
        return self.fc(torch.flatten(self.pool(self.act(x)), 1))


@register_architecture(
    "blimsr", seed="blimsr-blind-degradation-ct.md", discriminator=BliMSRDiscriminator, training_pairs="blind",
    loss_recipe="blimsr",
    description="BliMSR: multi-head-attention residual generator (~19M) and spectral-norm discriminator, trained "
                "on blind degradations (Dey et al. 2023).")
class BliMSRGenerator(SRGenerator):
    """BliMSR attention generator; the defaults give the full ~19.4M-parameter network."""

    def __init__(self, scale: int = 4, n_groups: int = 8, n_blocks: int = 16, n_feats: int = 64,
                 reduction: int = 4) -> None:
        super().__init__(scale)
        self.head = conv2d(1, n_feats, 3)
        self.body = nn.Sequential(*[ResidualGroup(n_feats, n_blocks, reduction) for _ in range(n_groups)])
        self.body_tail = conv2d(n_feats, n_feats, 1)
        stages: list[nn.Module] = []
        channels = 2 * n_feats  # deep features concatenated with the shallow ones
        for _ in range(int(math.log2(self.scale))):
            stages += [conv2d(channels, 4 * n_feats, 3), nn.PixelShuffle(2)]
            channels = n_feats
        self.upsampler = nn.Sequential(*stages)
        self.tail = shrink_init_(conv2d(n_feats, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(self.centered(x))
        feat = torch.cat([self.body_tail(self.body(shallow)), shallow], dim=1)
        return self.finish(bicubic_upsample(x, self.scale), self.tail(self.upsampler(feat)))
