"""Layers shared by the MedSR generators and discriminators.

Output range (one rule for every generator)
-------------------------------------------
Every learned generator predicts a *residual over the bicubic upsampling of its input*:
``y = bicubic_upsample(x, scale) + body(x)``, with the last layer of ``body`` initialised
small (:func:`shrink_init_`). The seeds end in ``tanh``/``sigmoid`` heads instead; we drop
them because medical images have large exact-0 backgrounds (and saturated 1.0 regions in
X-rays) that a squashing head can only reach with unbounded logits and vanishing gradients.
With the residual form the untrained network already outputs bicubic (inside [0, 1] up to the
few-percent bicubic overshoot), and training only has to learn the missing detail.

Input centring (one rule for every generator)
---------------------------------------------
The learned branch sees ``x - 0.5`` (:meth:`SRGenerator.centered`), the skip sees ``x``. The
training data are mostly dark (MRI and CT backgrounds at 0), and a ReLU network fitted to them
went dead on bright inputs: ESPCN x4 returned a residual of exactly 0 on every flat input above
0.3, so it never denoised the bright X-ray tiles (val `realistic` X-ray -0.004 dB; +2.4 dB with
centring, the same steps and seed). EDSR's ``MeanShift`` does the same with the dataset's mean;
a fixed constant, not the image's own mean, keeps every pixel's output independent of far-away
pixels, so tiled inference stays exact. The constant is a buffer: it changes the checkpoint
layout, so a checkpoint of an uncentred network is refused instead of silently mis-read.

Generators never clamp in training mode (clamping zeroes the gradient of every pixel it
touches); in eval mode they clamp to [0, 1] so inference honours the array contract.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from medsr.scale import check_scale


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """Convolution with 'same' padding so every layer keeps odd input sizes intact."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


class SeparableConv2d(nn.Module):
    """Depthwise (k x k, one filter per channel) then pointwise (1 x 1) convolution.

    Costs ``C*k*k + C*C'`` weights instead of ``C*C'*k*k``; this is the whole of the
    Swift-SRGAN saving over SRGAN.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                                   groups=in_channels, bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def make_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
              separable: bool = False) -> nn.Module:
    """A plain or depthwise-separable 'same' convolution."""
    if separable:
        return SeparableConv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
    return conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)


def make_activation(kind: str | None, channels: int) -> nn.Module:
    """``"prelu"`` (per channel, as Swift-SRGAN), ``"leaky"`` (slope 0.2, GAN discriminators),
    ``"relu"`` or ``None``."""
    if kind is None:
        return nn.Identity()
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    if kind == "leaky":
        return nn.LeakyReLU(0.2, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}")


class ConvBlock(nn.Module):
    """Convolution, optional BatchNorm, optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 batch_norm: bool = True, act: str | None = "prelu", separable: bool = False) -> None:
        super().__init__()
        # A bias before BatchNorm is cancelled by the mean subtraction: leave it out.
        self.conv = make_conv(in_channels, out_channels, kernel_size, stride=stride, bias=not batch_norm,
                              separable=separable)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = make_activation(act, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """SRResNet residual block: conv-(BN)-act-conv-(BN) plus identity."""

    def __init__(self, channels: int, batch_norm: bool = True, act: str = "prelu", separable: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, 3, batch_norm=batch_norm, act=act, separable=separable),
            ConvBlock(channels, channels, 3, batch_norm=batch_norm, act=None, separable=separable),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PixelShuffleUpsampler(nn.Sequential):
    """``log2(scale)`` stages of conv(C -> 4C), PixelShuffle(2), PReLU.

    Stacked x2 stages (SRGAN) rather than one PixelShuffle(scale): each stage's conv sees the
    previous stage's output, so x4 detail is built in two refinements.
    """

    def __init__(self, channels: int, scale: int, separable: bool = False, act: str | None = "prelu") -> None:
        stages = int(math.log2(scale))
        if scale < 2 or 2**stages != scale:
            raise ValueError(f"PixelShuffleUpsampler needs a power-of-two scale, got {scale}")
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [make_conv(channels, 4 * channels, 3, separable=separable), nn.PixelShuffle(2),
                       make_activation(act, channels)]
        super().__init__(*layers)


def spectral_conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                    bias: bool = True) -> nn.Module:
    """'Same' convolution with spectral normalisation (Miyato et al. 2018) on its weight."""
    return spectral_norm(conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias))


def spectral_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Linear layer with spectral normalisation on its weight."""
    return spectral_norm(nn.Linear(in_features, out_features, bias=bias))


class GlobalPoolClassifier(nn.Module):
    """Global average pool, dense(hidden), LeakyReLU, dense(1) -> one logit per image.

    Replaces SRGAN's flatten-then-dense (and Swift-SRGAN's AdaptiveAvgPool(6, 6)), which tie
    the discriminator to one patch size; pooling first makes it accept any patch.
    """

    def __init__(self, channels: int, hidden: int = 1024) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(torch.flatten(self.pool(x), 1))))


@torch.no_grad()
def shrink_init_(module: nn.Module, factor: float = 0.1) -> nn.Module:
    """Scale the weight of the *last* conv/linear layer in ``module`` by ``factor``; zero its bias.

    Used on the last layer of a residual branch so the branch starts as a small perturbation
    (ESRGAN's "smaller initialisation") and an untrained generator outputs about its bicubic
    skip. Only the last layer: shrinking both halves of a separable conv would shrink by
    ``factor**2`` and starve the earlier layers of gradient.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
    if not layers:
        raise ValueError("shrink_init_: no conv or linear layer in module")
    layers[-1].weight.mul_(factor)
    if layers[-1].bias is not None:
        layers[-1].bias.zero_()
    return module


INPUT_CENTER: float = 0.5


class SRGenerator(nn.Module):
    """Base class of every generator: 1 channel in and out, integer ``scale`` attribute.

    Subclasses feed their learned branch ``self.centered(x)`` and add its output to the bicubic
    skip of the raw ``x`` with :meth:`finish` (module docstring: output range, input centring).
    """

    scale: int
    input_center: torch.Tensor

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = check_scale(scale)
        self.register_buffer("input_center", torch.tensor(INPUT_CENTER))

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        """``x - input_center``: what the learned branch sees (the skip keeps ``x``)."""
        return x - self.input_center

    def finish(self, upsampled: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Add the residual to the bicubic skip; clamp to [0, 1] only outside training."""
        out = upsampled if residual is None else upsampled + residual
        return out if self.training else out.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
