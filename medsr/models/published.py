"""What the architectures with published RGB weights (RLFN, SPAN, RFDN) share: the grey conversion.

Each of these models is two classes in its own file: the *trunk*, the authors' network with their
parameter names (``conv_1.weight``, ``upsampler.0.weight`` ...), which loads the published
``state_dict`` with ``strict=True`` at 3 colour channels; and the registered MedSR generator, which
holds a 1-colour trunk under ``trunk.`` and takes and returns grey ``(N, 1, h, w)`` in [0, 1].
:func:`grey_state_dict` turns a published RGB state into the generator's state, exactly for grey
input (R = G = B):

* the input range and the per-colour mean are the architecture's spec (:class:`PublishedLayout`):
  RLFN and RFDN take ``255 * x``, SPAN takes ``255 * (x - rgb_mean)``;
* the first convolution's weights are summed over the three colours (they all see the same grey
  value); the generator feeds it the centred input like every MedSR generator
  (:mod:`medsr.models.blocks`), in the published range: ``input_range * (x - 0.5)``, so the
  difference between what the published network subtracted (its mean, or nothing) and 0.5 becomes
  a constant added after that convolution. Inside the image that constant is one number per channel (it folds into the bias);
  within the kernel's reach of the border the zero padding cuts part of it off, so it is kept as a
  kernel (``input_offset_kernel``, a buffer) applied to an image of ones with the same padding:
  then the grey network equals the RGB one at every pixel, border included;
* the last convolution before the pixel shuffle emits ``3 * scale**2`` channels, colour-major
  (PixelShuffle reads channel ``c * scale**2 + phase`` as colour ``c``); the grey network's
  ``scale**2`` are the mean of the three colours' rows, and the generator divides the result by the
  output range, so its output is the mean of R, G and B in [0, 1].

The ranges stay outside the weights on purpose: folded in, the first convolution's weights would be
255 times and the last one's 1/255 times the published ones, and Adam, whose steps have the size of
the learning rate whatever the weight's scale, would then barely move the first layer and throw
the last one around when fine-tuning.

Why direct prediction (no bicubic skip) and how it fits the generators' rule
-------------------------------------------------------------------------------
Every other MedSR generator outputs ``bicubic(x) + residual`` so that, untrained, it outputs
bicubic and training only adds detail. These trunks output the image itself, and a bicubic skip
cannot be added without changing what the published weights compute (the skip is not a function
of their features). They are meant to start from those weights, which is the rule's intent taken
further: the starting point is a network already 3-4 dB above bicubic on clean test input, and
fine-tuning moves away from it only as far as it must (:mod:`medsr.finetune`: EMA, interpolation
back towards the published weights, the noise gate; docs/pretrained.md). The rest of the rule
holds: 1 channel in and out, the centred input (``x - 0.5``, in the published range) to the first
convolution, no clamp in
training mode and a clamp to [0, 1] in eval mode. Built without weights (from scratch) the last
convolution starts small (:func:`~medsr.models.blocks.shrink_init_`), so the untrained output is
near 0 rather than an arbitrary activation; training such a network from scratch is possible but
not what these files are for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsr.models.blocks import INPUT_CENTER, SRGenerator, shrink_init_

RGB = 3


@dataclass(frozen=True)
class PublishedLayout:
    """How a published RGB network reads and writes images, and where its ends are in its state.

    ``first_conv``/``last_conv``: key prefixes (``<prefix>.weight``, ``<prefix>.bias``) of the
    first convolution and of the convolution before the pixel shuffle. The network sees
    ``input_range * (x - rgb_mean[c])`` for an image ``x`` in [0, 1] and returns the image times
    ``output_range``.
    """

    first_conv: str
    last_conv: str
    input_range: float
    output_range: float
    rgb_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)


def esa_pool(x: torch.Tensor, kernel: int = 7, stride: int = 3) -> torch.Tensor:
    """The ESA's ``max_pool2d(x, 7, stride=3)``, padded with -inf to the kernel where ``x`` is smaller.

    The published code fails on LR inputs under 15 px (the stride-2 conv before the pool leaves
    fewer than 7); padding only then keeps every size the published code accepts exact and lets a
    12 px patch through (a max over -inf padding is the max of the real values).
    """
    short_h, short_w = max(0, kernel - x.shape[-2]), max(0, kernel - x.shape[-1])
    if short_h or short_w:
        x = F.pad(x, (0, short_w, 0, short_h), value=float("-inf"))
    return F.max_pool2d(x, kernel_size=kernel, stride=stride)


def pixelshuffle_head(in_channels: int, colours: int, scale: int) -> nn.Sequential:
    """The published ``upsampler``: a 3x3 conv to ``colours * scale**2`` channels, PixelShuffle."""
    return nn.Sequential(nn.Conv2d(in_channels, colours * scale * scale, 3, padding=1), nn.PixelShuffle(scale))


class GreyPublishedGenerator(SRGenerator):
    """Base of the grey generators around a published trunk (module docstring).

    Subclasses set ``layout`` and ``trunk_class``; the trunk is built at 1 colour, and its ``forward``
    takes the first convolution's input and an ``offset`` added after that convolution.
    """

    layout: PublishedLayout
    trunk_class: type[nn.Module]  # called as trunk_class(scale, colours=...)
    trunk: nn.Module
    input_offset_kernel: torch.Tensor

    @classmethod
    def from_published(cls, rgb_state: Mapping[str, torch.Tensor], scale: int) -> GreyPublishedGenerator:
        """The grey generator equal to the published RGB network ``rgb_state`` at ``scale``.

        Raises:
            ValueError: ``rgb_state`` does not load strictly into the RGB trunk (another
                architecture, scale or variant); the message names the first mismatches.
        """
        try:
            cls.trunk_class(scale, colours=RGB).load_state_dict(rgb_state, strict=True)
        except RuntimeError as err:
            details = " ".join(str(err).split())
            raise ValueError(f"not a published {cls.__name__} x{scale} checkpoint: {details[:300]}") from err
        generator = cls(scale)
        generator.load_state_dict(grey_state_dict(rgb_state, cls.layout, generator), strict=True)
        return generator

    def __init__(self, scale: int = 4, **trunk_options: Any) -> None:
        """``trunk_options`` go to the trunk (e.g. ``features``); an unknown one raises TypeError."""
        super().__init__(scale)
        self.trunk = self.trunk_class(self.scale, colours=1, **trunk_options)
        first = self.trunk.get_submodule(self.layout.first_conv)
        # Zero for a network built from scratch; grey_state_dict fills it from the published weights.
        self.register_buffer("input_offset_kernel", torch.zeros(first.out_channels, 1, *first.kernel_size))
        # Small in the output's units whatever the ranges (SPAN reads x255 and writes x1).
        shrink_init_(self.trunk.get_submodule(self.layout.last_conv),
                     factor=0.1 * self.layout.output_range / self.layout.input_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.trunk.get_submodule(self.layout.first_conv)
        ones = torch.ones_like(x[:, :1])
        offset = F.conv2d(ones, self.input_offset_kernel, padding=first.padding)
        return self.finish(self.trunk(self.centered(x) * self.layout.input_range, offset) / self.layout.output_range)


def grey_state_dict(rgb_state: Mapping[str, torch.Tensor], layout: PublishedLayout,
                    generator: GreyPublishedGenerator) -> dict[str, torch.Tensor]:
    """The state of ``generator`` (a grey generator) equal, on grey input, to the RGB ``rgb_state``.

    ``rgb_state`` is a published ``state_dict`` (it must load strictly into the 3-colour trunk);
    the result loads strictly into ``generator`` (which supplies its own buffers, e.g. the input
    centre). Computed in float64 and stored in float32.

    Raises:
        ValueError: the first or last convolution is not RGB-shaped as ``layout`` says.
    """
    state = {key: value.detach().to(torch.float64) for key, value in rgb_state.items()}
    w_first, w_last = state[f"{layout.first_conv}.weight"], state[f"{layout.last_conv}.weight"]
    if w_first.shape[1] != RGB:
        raise ValueError(f"{layout.first_conv}.weight has {w_first.shape[1]} input channels, expected {RGB} (RGB)")
    if w_last.shape[0] % RGB:
        raise ValueError(f"{layout.last_conv}.weight has {w_last.shape[0]} outputs, not 3 colours x scale**2")
    mean = torch.tensor(layout.rgb_mean, dtype=torch.float64).view(1, RGB, 1, 1)
    grey = {f"trunk.{key}": value for key, value in state.items()}
    grey[f"trunk.{layout.first_conv}.weight"] = w_first.sum(dim=1, keepdim=True)
    # The published net sees range * (x - mean_c); the grey one range * (x - 0.5) through the summed
    # weights: the difference range * sum_c (0.5 - mean_c) * W_c is the offset kernel (module docstring).
    offset = layout.input_range * ((INPUT_CENTER - mean) * w_first).sum(dim=1, keepdim=True)
    phases = w_last.shape[0] // RGB
    b_last = state[f"{layout.last_conv}.bias"]
    grey[f"trunk.{layout.last_conv}.weight"] = w_last.reshape(RGB, phases, *w_last.shape[1:]).mean(0)
    grey[f"trunk.{layout.last_conv}.bias"] = b_last.reshape(RGB, phases).mean(0)
    own = generator.state_dict()
    result = {key: own[key] for key in own if not key.startswith("trunk.")}
    result.update({key: value.to(torch.float32) for key, value in grey.items()})
    result["input_offset_kernel"] = offset.to(torch.float32)
    return result


def rgb_reference_output(trunk: nn.Module, grey: torch.Tensor, layout: PublishedLayout) -> torch.Tensor:
    """What the published RGB ``trunk`` makes of a grey image ``(N, 1, h, w)`` in [0, 1], as MedSR
    reads it: the image copied to R, G and B in the spec's range, the output's colour mean back in
    [0, 1] (unclamped). The reference the grey conversion is checked against."""
    mean = torch.tensor(layout.rgb_mean, dtype=grey.dtype, device=grey.device).view(1, RGB, 1, 1)
    rgb = layout.input_range * (grey.expand(-1, RGB, -1, -1) - mean)
    return trunk(rgb, None).mean(dim=1, keepdim=True) / layout.output_range
