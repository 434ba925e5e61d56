"""RLFN: residual local feature network, with the authors' parameter names (published weights load).

Paper: F. Kong et al., "Residual Local Feature Network for Efficient Super-Resolution", CVPRW 2022
(NTIRE 2022 efficient SR challenge). Published weights: github bytedance/RLFN, ``model_zoo/rlfn_x2.pth``
and ``rlfn_x4.pth`` (Apache-2.0), trained on DIV2K RGB, input and output in [0, 255].

Architecture: conv 3x3 (3 -> 52), six RLFBs, conv 3x3 plus the long skip, a 3x3 conv to
``3 * scale**2`` channels and PixelShuffle. An RLFB is three 3x3 convs with LeakyReLU(0.05) and a
skip, a 1x1 conv, then enhanced spatial attention (ESA: 1x1 down to 16 channels, a stride-2 3x3,
max-pool 7/3, a 3x3, bilinear back up, 1x1 up, sigmoid gate). The ESA's pooled branch makes the
output depend on where the pooling grid falls, so tiled inference is close to, not exactly, the
whole-image result.

:class:`RLFNTrunk` is that network at any number of colours (3 loads the published checkpoint with
``strict=True``); :class:`RLFN` is the registered grey MedSR generator around a 1-colour trunk,
made from the published weights by :func:`medsr.models.published.grey_state_dict`. It predicts the
image directly, not a residual over bicubic: see :mod:`medsr.models.published` for why and how
that fits the other generators' rule.

Parameter counts (1 channel in/out, counted by ``count_parameters``; the published RGB networks
have 526,856 (x2) and 543,740 (x4)):

    generator x2 = 522,168
    generator x4 = 527,796
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.published import GreyPublishedGenerator, PublishedLayout, esa_pool, pixelshuffle_head

LAYOUT = PublishedLayout(first_conv="conv_1", last_conv="upsampler.0", input_range=255.0, output_range=255.0)
FEATURES = 52
ESA_CHANNELS = 16
BLOCKS = 6


class ESA(nn.Module):
    """RLFN's enhanced spatial attention (RFANet's, without its ``conv_max`` and ``conv3_``)."""

    def __init__(self, esa_channels: int, n_feats: int) -> None:
        super().__init__()
        f = esa_channels
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c3 = self.conv3(esa_pool(self.conv2(c1_)))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))


class RLFB(nn.Module):
    """Residual local feature block: three 3x3 convs with a skip, a 1x1 conv, ESA."""

    def __init__(self, channels: int, esa_channels: int = ESA_CHANNELS) -> None:
        super().__init__()
        self.c1_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c3_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c5 = nn.Conv2d(channels, channels, 1)
        self.esa = ESA(esa_channels, channels)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.c3_r(self.act(self.c2_r(self.act(self.c1_r(x))))))
        return self.esa(self.c5(out + x))


class RLFNTrunk(nn.Module):
    """The published RLFN at ``colours`` channels in and out; keys as in bytedance/RLFN ``model/rlfn.py``.

    ``forward(x, offset)``: ``x`` in the published input range (``LAYOUT``), ``offset`` (or None) is
    added after the first convolution (the grey generator's folded mean, see ``published``).
    """

    def __init__(self, scale: int, colours: int = 3, features: int = FEATURES) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(colours, features, 3, padding=1)
        for index in range(1, BLOCKS + 1):
            self.add_module(f"block_{index}", RLFB(features))
        self.conv_2 = nn.Conv2d(features, features, 3, padding=1)
        self.upsampler = pixelshuffle_head(features, colours, scale)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        features = self.conv_1(x)
        if offset is not None:
            features = features + offset
        out = features
        for index in range(1, BLOCKS + 1):
            out = self.get_submodule(f"block_{index}")(out)
        return self.upsampler(self.conv_2(out) + features)


@register_architecture(
    "rlfn", training_pairs="standard",
    description="RLFN (Kong et al. 2022, NTIRE 2022 efficient SR): six residual local feature blocks with "
                "spatial attention, direct prediction; 0.53M parameters, made to start from the published "
                "DIV2K weights (Apache-2.0) converted to grey.")
class RLFN(GreyPublishedGenerator):
    """Grey RLFN: ``trunk(x - 0.5)`` with the published weights folded to 1 colour (``published``)."""

    layout = LAYOUT
    trunk_class = RLFNTrunk
