"""RFDN: residual feature distillation network, with the authors' parameter names (published weights load).

Paper: J. Liu, J. Tang, G. Wu, "Residual Feature Distillation Network for Lightweight Image
Super-Resolution", ECCVW 2020 (winner of the AIM 2020 efficient SR challenge). Published weights:
github njulj/RFDN, ``trained_model/RFDN_AIM.pth`` (MIT; code ``RFDN.py``, ``block.py``), x4, trained
on DIV2K RGB, input and output in [0, 255]. A third reference beside RLFN (its successor in the
same challenge line) and SPAN.

Architecture: conv 3x3 (3 -> 50), four RFDBs, a 1x1 conv over their concatenation with
LeakyReLU(0.05), conv 3x3 plus the long skip, a 3x3 conv to ``3 * scale**2`` channels and
PixelShuffle. An RFDB distils 25 channels (1x1 conv) at each of three shallow residual 3x3 steps
and a fourth 3x3, fuses the four with a 1x1 conv and gates it with ESA (RFANet's full ESA, with
``conv_max`` and ``conv3_``). As in RLFN, the ESA's pooling makes tiled inference close to, not
exactly, the whole-image result.

:class:`RFDNTrunk` is that network at any number of colours (3 loads the published checkpoint with
``strict=True``); :class:`RFDN` is the registered grey MedSR generator around a 1-colour trunk,
made from the published weights by :func:`medsr.models.published.grey_state_dict`. It predicts the
image directly, not a residual over bicubic: see :mod:`medsr.models.published` for why and how
that fits the other generators' rule.

Parameter counts (1 channel in/out, counted by ``count_parameters``; the published RGB x4 network
has 433,448):

    generator x2 = 412,704
    generator x4 = 418,116
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.published import GreyPublishedGenerator, PublishedLayout, esa_pool, pixelshuffle_head

LAYOUT = PublishedLayout(first_conv="fea_conv", last_conv="upsampler.0", input_range=255.0, output_range=255.0)
FEATURES = 50
BLOCKS = 4


class ESA(nn.Module):
    """RFANet's enhanced spatial attention, as RFDN's ``block.py`` has it."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        f = n_feats // 4
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv_max = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv3_ = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        v_range = F.relu(self.conv_max(esa_pool(self.conv2(c1_))))
        c3 = self.conv3_(F.relu(self.conv3(v_range)))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))


class RFDB(nn.Module):
    """Residual feature distillation block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        distilled = channels // 2
        self.c1_d = nn.Conv2d(channels, distilled, 1)
        self.c1_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2_d = nn.Conv2d(channels, distilled, 1)
        self.c2_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c3_d = nn.Conv2d(channels, distilled, 1)
        self.c3_r = nn.Conv2d(channels, channels, 3, padding=1)
        self.c4 = nn.Conv2d(channels, distilled, 3, padding=1)
        self.act = nn.LeakyReLU(0.05)
        self.c5 = nn.Conv2d(distilled * 4, channels, 1)
        self.esa = ESA(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled, remaining = [], x
        for distil, refine in ((self.c1_d, self.c1_r), (self.c2_d, self.c2_r), (self.c3_d, self.c3_r)):
            distilled.append(self.act(distil(remaining)))
            remaining = self.act(refine(remaining) + remaining)
        distilled.append(self.act(self.c4(remaining)))
        return self.esa(self.c5(torch.cat(distilled, dim=1)))


class RFDNTrunk(nn.Module):
    """The published RFDN at ``colours`` channels in and out; keys as in njulj/RFDN ``RFDN.py``.

    ``forward(x, offset)``: ``x`` in the published input range (``LAYOUT``), ``offset`` (or None) is
    added after the first convolution (the grey generator's folded mean, see ``published``).
    """

    def __init__(self, scale: int, colours: int = 3, features: int = FEATURES) -> None:
        super().__init__()
        self.fea_conv = nn.Conv2d(colours, features, 3, padding=1)
        for index in range(1, BLOCKS + 1):
            self.add_module(f"B{index}", RFDB(features))
        self.c = nn.Sequential(nn.Conv2d(features * BLOCKS, features, 1), nn.LeakyReLU(0.05))
        self.LR_conv = nn.Conv2d(features, features, 3, padding=1)
        self.upsampler = pixelshuffle_head(features, colours, scale)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        features = self.fea_conv(x)
        if offset is not None:
            features = features + offset
        outs, out = [], features
        for index in range(1, BLOCKS + 1):
            out = self.get_submodule(f"B{index}")(out)
            outs.append(out)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + features)


@register_architecture(
    "rfdn", training_pairs="standard",
    description="RFDN (Liu et al. 2020, AIM 2020 efficient SR winner): four residual feature distillation "
                "blocks with spatial attention, direct prediction; 0.42M parameters, made to start from the "
                "published DIV2K weights (MIT) converted to grey.")
class RFDN(GreyPublishedGenerator):
    """Grey RFDN: ``trunk(x - 0.5)`` with the published weights folded to 1 colour (``published``)."""

    layout = LAYOUT
    trunk_class = RFDNTrunk
