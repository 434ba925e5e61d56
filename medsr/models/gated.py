"""The noise-gated pair: a published network where the input is clean, its fine-tune where it is noisy.

Networks trained on natural images are 3-4 dB above bicubic on clean input and below it on noisy
input; fine-tuned on MedSR's degradation range they learn the noise and give back part of the clean
quality (docs/pretrained.md). :class:`NoiseGated` keeps both: a frozen copy of the starting weights
(``published``) and the copy that trains (``tuned``), blended per image by the consistency step's
own noise estimate and weight shape (:func:`medsr.consistency.estimate_noise_sigma`,
:func:`~medsr.consistency.consistency_strength`)::

    w = 1 / (1 + (sigma / threshold)^exponent)        output = w * published(x) + (1 - w) * tuned'(x)

where ``tuned'`` holds the weights ``w0 + tuned_share * (w_tuned - w0)`` (WiSE-FT: Wortsman et al.,
"Robust fine-tuning of zero-shot models", CVPR 2022; ``tuned_share`` 1 is the fine-tune itself).

Any registered generator can be gated: ``build_generator(name, scale, noise_gate={...})`` builds
one (:func:`medsr.models.build_generator`), so the gate is a model option like any other, kept in
the checkpoint's metadata, and the trainer, the benchmark, the registry and serving build and load
it the same way. Contract:

* input and output are the generators' contract, ``(N, 1, h, w)`` -> ``(N, 1, h*s, w*s)`` in [0, 1];
* in training mode the module *is* the tuned branch (the gate is a choice made at inference; the
  published branch is frozen and gets no gradient);
* in eval mode each sample's weight comes from that sample, so a batch of whole images is gated
  per image. A tile is not an image: :meth:`with_weight` fixes one image's weight for all of its
  tiles (:meth:`medsr.inference.Upscaler.network` does that), so tiling changes no pixel's weight;
* a share under :data:`SKIP_SHARE` counts as 0 (it could move a pixel by less than 0.001), and a
  branch whose share is 0 for every sample is not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from medsr.consistency import consistency_strength, estimate_noise_sigma
from medsr.models.blocks import SRGenerator

SKIP_SHARE = 1e-3
GATE_KEYS = frozenset({"threshold", "exponent", "tuned_share"})


class NoiseGated(SRGenerator):
    """``published`` (frozen) and ``tuned`` generators of one scale, gated by input noise (module docstring).

    ``threshold`` (> 0) is the LR noise std at which the published share falls to one half,
    ``exponent`` (> 0) how steeply, ``tuned_share`` in [0, 1] the interpolation of the tuned
    weights from the published ones (below 1 the branches must have the same parameters).

    Raises:
        ValueError: a setting out of range, or branches of different scales.
    """

    def __init__(self, published: nn.Module, tuned: nn.Module, *, threshold: float, exponent: float,
                 tuned_share: float = 1.0) -> None:
        super().__init__(int(getattr(published, "scale", 0)))
        if getattr(tuned, "scale", None) != self.scale:
            raise ValueError(f"noise_gate: the branches' scales differ ({self.scale}, {getattr(tuned, 'scale', None)})")
        if not threshold > 0 or not exponent > 0:
            raise ValueError(f"noise_gate: threshold and exponent must be > 0, got {threshold}, {exponent}")
        if not 0.0 <= tuned_share <= 1.0:
            raise ValueError(f"noise_gate: tuned_share must be in [0, 1], got {tuned_share}")
        self.threshold, self.exponent, self.tuned_share = float(threshold), float(exponent), float(tuned_share)
        self.published = published.requires_grad_(False)
        self.tuned = tuned

    @classmethod
    def from_options(cls, make: Callable[[], nn.Module], options: Mapping[str, Any]) -> NoiseGated:
        """Two fresh branches from ``make``, gated as the ``noise_gate`` model option
        ``{threshold, exponent, tuned_share}`` says (``tuned_share`` optional)."""
        unknown = set(options) - GATE_KEYS
        missing = {"threshold", "exponent"} - set(options)
        if unknown or missing:
            raise ValueError(f"noise_gate: unknown keys {sorted(unknown)}, missing {sorted(missing)}; "
                             f"known: {sorted(GATE_KEYS)}")
        return cls(make(), make(), threshold=float(options["threshold"]), exponent=float(options["exponent"]),
                   tuned_share=float(options.get("tuned_share", 1.0)))

    def load_start(self, state: Mapping[str, torch.Tensor]) -> None:
        """Both branches from one branch's ``state`` (the published weights), strictly."""
        self.published.load_state_dict(state, strict=True)
        self.tuned.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> NoiseGated:
        super().train(mode)
        self.published.eval()  # frozen: its batch statistics, if any, never move
        return self

    def weight(self, lr: np.ndarray) -> float:
        """The published branch's share for one contract image ``(1, h, w)``."""
        return consistency_strength(estimate_noise_sigma(lr), self.threshold, self.exponent)

    def for_image(self, lr: np.ndarray) -> GateWeighted:
        """This pair with every sample's weight fixed to that of the whole image ``lr`` (for its tiles)."""
        return GateWeighted(self, self.weight(lr))

    def tuned_output(self, x: torch.Tensor) -> torch.Tensor:
        """The tuned branch at ``tuned_share`` of the way from the published weights."""
        if self.tuned_share == 1.0:
            return self.tuned(x)
        start = dict(self.published.named_parameters())
        mixed = {name: start[name] + self.tuned_share * (p - start[name]) for name, p in self.tuned.named_parameters()}
        return functional_call(self.tuned, mixed, (x,))

    def blend(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``w * published(x) + (1 - w) * tuned'(x)`` with one weight per sample (``(N,)``)."""
        # Shares within SKIP_SHARE of 0 or 1 are snapped, so an image gets the same pixels alone or in a batch.
        weights = torch.where(weights >= 1.0 - SKIP_SHARE, 1.0, torch.where(weights <= SKIP_SHARE, 0.0, weights))
        if bool((weights == 1.0).all()):
            return self.published(x)
        if bool((weights == 0.0).all()):
            return self.tuned_output(x)
        w = weights.to(x.device, x.dtype).view(-1, 1, 1, 1)
        return w * self.published(x) + (1.0 - w) * self.tuned_output(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.tuned(x)
        # The noise estimate is numpy/scipy (the consistency step's own): a host copy of each input.
        lrs = x.detach().float().numpy(force=True)
        return self.blend(x, torch.tensor([self.weight(lr) for lr in lrs], dtype=torch.float64))

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, threshold={self.threshold}, exponent={self.exponent}, "
                f"tuned_share={self.tuned_share}")


class GateWeighted(nn.Module):
    """A :class:`NoiseGated` pair with the weight fixed, for the tiles of one image (eval only).

    It shares the pair's parameters (its receptive radius is the pair's: measure that on the pair,
    once, not on a new module per image).
    """

    def __init__(self, pair: NoiseGated, weight: float) -> None:
        super().__init__()
        self.pair = pair
        self.weight = float(weight)
        self.scale = pair.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair.blend(x, torch.full((x.shape[0],), self.weight, dtype=torch.float64))
