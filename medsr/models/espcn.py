"""ESPCN: efficient sub-pixel convolutional network.

Seed: ``espcn-brain-mri.md`` (brain MRI, x4, 64x64 -> 256x256; built on the Keras
"super_resolution_sub_pixel" example). Paper: W. Shi et al., "Real-Time Single Image and
Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016
(arXiv:1609.05158).

Architecture: Conv(64, 5x5) - Conv(64, 3x3) - Conv(32, 3x3) - Conv(scale^2, 3x3) -
PixelShuffle(scale), all in LR space so the cost is paid at 1/scale^2 of the HR pixels.

Activations: per-channel PReLU (FSRCNN's choice), not the paper's tanh nor the seed's ReLU.
tanh saturates on the large zero-valued background of MRI slices. ReLU (the seed's Keras
example) left units dead on the bright, flat X-ray tiles: trained on the sample at x4, the
ReLU network's residual on flat noisy inputs was 0.0002 at every intensity, so it never
denoised X-ray (val `realistic` X-ray -0.03 dB), and whether it learned to varied from run to
run; with PReLU the same recipe gained +3.0 dB (clean_fraction 0.3) and +0.9 dB (0.5) there,
and every val cell rose above bicubic at x4. Orthogonal initialisation is kept from the seed.
The last conv is linear (the Keras example puts a ReLU there too) because it emits a signed
residual over bicubic (see ``blocks`` module docstring), not the image itself.

Parameter counts (1 channel in/out, counted by ``count_parameters``):

    generator x2 = 58,372
    generator x4 = 61,840
"""

from __future__ import annotations

import torch
from torch import nn

from medsr.models.architectures import register_architecture
from medsr.models.blocks import SRGenerator, conv2d, shrink_init_
from medsr.ops import bicubic_upsample


@register_architecture(
    "espcn", seed="espcn-brain-mri.md",
    description="ESPCN: four LR-space convs and one sub-pixel shuffle (Shi et al. 2016); 62k parameters.")
class ESPCN(SRGenerator):
    """ESPCN generator; output = bicubic(x) + PixelShuffle(conv stack(x - 0.5))."""

    def __init__(self, scale: int = 4) -> None:
        super().__init__(scale)
        s = self.scale
        self.body = nn.Sequential(
            conv2d(1, 64, 5), nn.PReLU(64),
            conv2d(64, 64, 3), nn.PReLU(64),
            conv2d(64, 32, 3), nn.PReLU(32),
            conv2d(32, s * s, 3),
            nn.PixelShuffle(s),
        )
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                nn.init.orthogonal_(layer.weight)
                nn.init.zeros_(layer.bias)
        shrink_init_(self.body[6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(bicubic_upsample(x, self.scale), self.body(self.centered(x)))
