"""SPAN: swift parameter-free attention network, with the authors' parameter names (published weights load).

Paper: C. Wan et al., "Swift Parameter-free Attention Network for Efficient Super-Resolution",
CVPRW 2024 (winner of the NTIRE 2024 efficient SR challenge). Published weights: github
Amazingren/NTIRE2024_ESR, ``model_zoo/team38_span_ch28_slim.pth`` (MIT; code ``models/team38_SPAN.py``,
class ``SPAN30`` at ``feature_channels=28``), trained on DIV2K + LSDIR RGB. Input in [0, 1]: the
network computes ``255 * (x - rgb_mean)`` itself; output in [0, 1].

Architecture: every 3x3 conv is a re-parameterised ``Conv3XC`` whose training-time 1x1-3x3-1x1 and
skip branches were merged into one ``eval_conv`` before publishing (only ``eval_conv`` is in the
checkpoint, and only it is here). conv_1, six SPABs, conv_2, a 1x1 ``conv_cat`` over the
concatenation of the first features, conv_2's output, the first block's output and the last block's
first activation, then a 3x3 conv to ``3 * scale**2`` channels and PixelShuffle. A SPAB is three convs with
SiLU between them and a parameter-free attention: ``(out3 + x) * (sigmoid(out3) - 0.5)``. No pooling:
the receptive field is local and tiled inference is exact.

:class:`SPANTrunk` is that network at any number of colours (3 loads the published checkpoint with
``strict=True``); :class:`SPAN` is the registered grey MedSR generator around a 1-colour trunk,
made from the published weights by :func:`medsr.models.published.grey_state_dict` (its per-colour
mean folds into ``input_offset_kernel``). It predicts the image directly, not a residual over
bicubic: see :mod:`medsr.models.published` for why and how that fits the other generators' rule.

Parameter counts (1 channel in/out, counted by ``count_parameters``; the published RGB x4 network
has 150,688):

    generator x2 = 139,052
    generator x4 = 142,088
"""

from __future__ import annotations

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.published import GreyPublishedGenerator, PublishedLayout, pixelshuffle_head

LAYOUT = PublishedLayout(first_conv="conv_1.eval_conv", last_conv="upsampler.0", input_range=255.0,
                         output_range=1.0, rgb_mean=(0.4488, 0.4371, 0.4040))
FEATURES = 28
BLOCKS = 6


class Conv3XC(nn.Module):
    """The re-parameterised 3x3 conv as published: only its merged ``eval_conv``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_conv(x)


class SPAB(nn.Module):
    """Swift parameter-free attention block (``SPAB1``); returns the block output and its first conv's
    activated output.

    The published code returns ``out1``, the first conv's output, but activates it with an in-place
    ``SiLU(inplace=True)`` before returning, so what it really hands on (the last block's one goes
    into ``conv_cat``) is ``silu(out1)``; the weights were trained with that, and the raw ``out1``
    gives a 4x4 phase pattern on a flat input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1_r = Conv3XC(channels, channels)
        self.c2_r = Conv3XC(channels, channels)
        self.c3_r = Conv3XC(channels, channels)
        self.act1 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out1_act = self.act1(self.c1_r(x))
        out3 = self.c3_r(self.act1(self.c2_r(out1_act)))
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), out1_act


class SPANTrunk(nn.Module):
    """The published SPAN at ``colours`` channels in and out; keys as in ``team38_SPAN.py``'s SPAN30.

    ``forward(x, offset)``: ``x`` already ``255 * (image - rgb_mean)`` (``LAYOUT``; the published
    class does that step inside its forward), ``offset`` (or None) is added after the first conv.
    """

    def __init__(self, scale: int, colours: int = 3, features: int = FEATURES) -> None:
        super().__init__()
        self.conv_1 = Conv3XC(colours, features)
        for index in range(1, BLOCKS + 1):
            self.add_module(f"block_{index}", SPAB(features))
        self.conv_cat = nn.Conv2d(features * 4, features, 1)
        self.conv_2 = Conv3XC(features, features)
        self.upsampler = pixelshuffle_head(features, colours, scale)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        features = self.conv_1(x)
        if offset is not None:
            features = features + offset
        out_b1, _ = self.block_1(features)
        out = out_b1
        for index in range(2, BLOCKS):
            out, _ = self.get_submodule(f"block_{index}")(out)
        out_b6, last_first_conv = self.get_submodule(f"block_{BLOCKS}")(out)
        out = self.conv_cat(torch.cat([features, self.conv_2(out_b6), out_b1, last_first_conv], 1))
        return self.upsampler(out)


@register_architecture(
    "span", training_pairs="standard",
    description="SPAN (Wan et al. 2024, NTIRE 2024 efficient SR winner), 28 channels: six parameter-free "
                "attention blocks, direct prediction; 0.15M parameters, made to start from the published "
                "DIV2K+LSDIR weights (MIT) converted to grey.")
class SPAN(GreyPublishedGenerator):
    """Grey SPAN: ``trunk(x - 0.5)`` with the published weights folded to 1 colour (``published``)."""

    layout = LAYOUT
    trunk_class = SPANTrunk
