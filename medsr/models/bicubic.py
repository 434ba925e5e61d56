"""Bicubic interpolation baseline as a generator with zero parameters.

Seed: none of its own; every seed compares against bicubic (``espcn-brain-mri.md`` and
``swift-srgan-chest-xray.md`` report it explicitly). Reference: R. Keys, "Cubic Convolution
Interpolation for Digital Image Processing", IEEE TASSP 1981 (``F.interpolate`` bicubic,
a = -0.75, align_corners=False).

It is the same operator (:func:`medsr.ops.bicubic_upsample`) that the learned generators use as their
global skip and that the residual CNN refines, so a model's gain over this baseline is exactly
what its learned branch adds. Unclamped in training mode (it overshoots by a few percent at
sharp edges), clamped to [0, 1] in eval mode like every generator. It has no parameters: the
trainer must skip it (an optimiser over an empty parameter list raises).

Parameter counts (1 channel in/out, counted by ``count_parameters``):

    generator x2 = 0
    generator x4 = 0
"""

from __future__ import annotations

import torch

from medsr.models.architectures import register_architecture
from medsr.models.blocks import SRGenerator
from medsr.ops import bicubic_upsample


@register_architecture("bicubic", trained=False,
                       description="Bicubic interpolation baseline (no parameters, nothing to train).")
class Bicubic(SRGenerator):
    """Bicubic upsampling by ``scale``."""

    def __init__(self, scale: int = 4) -> None:
        super().__init__(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(bicubic_upsample(x, self.scale))
