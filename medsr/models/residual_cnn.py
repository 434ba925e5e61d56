"""Light five-layer residual CNN, trained self-supervised.

Seed: ``light-residual-cnn-ct.md`` (CT, github.com/Destrot1/Super_resolution, no paper; the
residual-over-interpolation idea is VDSR: J. Kim et al., "Accurate Image Super-Resolution
Using Very Deep Convolutional Networks", CVPR 2016).

``y = up + net(up - 0.5)`` with ``up = bicubic_upsample(x, scale)`` (``F.interpolate`` bicubic,
align_corners=False; the same operator as the ``bicubic`` baseline) and ``net`` five 3x3
convs, 1 -> 64 -> 64 -> 64 -> 64 -> 1, ReLU after all but the last (the residual is signed).
Unlike the other generators it works in HR space: it refines an interpolated image, so its
cost grows with the output size, and it does not care which factor produced ``up``.

Training is self-supervised (``ModelSpec.training_pairs == "ssl"``): the network learns
VLR -> LR, where VLR is the LR image degraded once more with the same operator, and is then
applied LR -> HR. It never sees HR during training; this relies on the degradation being
roughly scale-invariant, which the seed found to hold for CT.

Parameter counts (1 channel in/out, counted by ``count_parameters``; independent of scale):

    generator x2 = 112,001
    generator x4 = 112,001
"""

from __future__ import annotations

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import SRGenerator, conv2d, shrink_init_
from medsr.ops import bicubic_upsample


@register_architecture(
    "residual_cnn", seed="light-residual-cnn-ct.md", training_pairs="ssl",
    description="Light residual CNN: bicubic plus a five-layer ReLU CNN residual, trained self-supervised "
                "VLR->LR and applied LR->HR.")
class ResidualCNN(SRGenerator):
    """``bicubic(x) + net(bicubic(x) - 0.5)`` with a five-layer ReLU CNN."""

    def __init__(self, scale: int = 2, n_feats: int = 64, n_layers: int = 5) -> None:
        super().__init__(scale)
        if n_layers < 2:
            raise ValueError(f"n_layers must be at least 2, got {n_layers}")
        layers: list[nn.Module] = [conv2d(1, n_feats, 3), nn.ReLU(inplace=True)]
        for _ in range(n_layers - 2):
            layers += [conv2d(n_feats, n_feats, 3), nn.ReLU(inplace=True)]
        layers.append(shrink_init_(conv2d(n_feats, 1, 3)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = bicubic_upsample(x, self.scale)
        return self.finish(up, self.net(self.centered(up)))
