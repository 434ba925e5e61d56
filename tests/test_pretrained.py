"""Published-weight architectures (RLFN, SPAN, RFDN) and the grey conversion.

The checkpoints here are random weights in the published layout (the trunks' own ``state_dict``
at 3 colours, saved and read back with ``torch.load(weights_only=True)``), so the tests run
without the published files; the layout itself is pinned by the key count, value count and
a few shapes read off the real files (benchmarks/bench_pretrained.py loads those strictly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from medsr.models import build_generator
from medsr.models import rfdn, rlfn, span
from medsr.models.published import grey_state_dict, rgb_reference_output

# name, scale, module, trunk class, (number of tensors, number of values, {key: shape}) of the published file
PUBLISHED = [
    ("rlfn", 2, rlfn, rlfn.RLFNTrunk, (114, 526_856, {"conv_1.weight": (52, 3, 3, 3),
                                                     "block_6.esa.conv4.weight": (52, 16, 1, 1),
                                                     "upsampler.0.weight": (12, 52, 3, 3)})),
    ("rlfn", 4, rlfn, rlfn.RLFNTrunk, (114, 543_740, {"upsampler.0.weight": (48, 52, 3, 3)})),
    ("span", 4, span, span.SPANTrunk, (44, 150_688, {"conv_1.eval_conv.weight": (28, 3, 3, 3),
                                                    "conv_cat.weight": (28, 112, 1, 1),
                                                    "upsampler.0.bias": (48,)})),
    ("rfdn", 4, rfdn, rfdn.RFDNTrunk, (128, 433_448, {"fea_conv.weight": (50, 3, 3, 3),
                                                     "B4.esa.conv3_.weight": (12, 12, 3, 3),
                                                     "c.0.weight": (50, 200, 1, 1)})),
]
IDS = [f"{name}-x{scale}" for name, scale, *_ in PUBLISHED]


def random_published_checkpoint(trunk_class: type[torch.nn.Module], scale: int, path: Path) -> dict:
    """A checkpoint file in the published layout with random weights, read back as a user would."""
    torch.manual_seed(scale)
    torch.save(trunk_class(scale).state_dict(), path)
    return torch.load(path, weights_only=True, map_location="cpu")


def grey_image(h: int = 29, w: int = 34, seed: int = 0) -> torch.Tensor:
    """A smooth grey image in [0, 1] with an exact-0 corner (the MR/CT background case)."""
    field = gaussian_filter(np.random.default_rng(seed).random((h, w)), 2.0)
    image = (field - field.min()) / (field.max() - field.min())
    image[: h // 3, : w // 3] = 0.0
    return torch.from_numpy(image.astype(np.float32))[None, None]


@pytest.mark.parametrize(("name", "scale", "module", "trunk_class", "layout"), PUBLISHED, ids=IDS)
def test_a_checkpoint_in_the_published_layout_loads_strictly(name, scale, module, trunk_class, layout,
                                                             tmp_path: Path) -> None:
    state = random_published_checkpoint(trunk_class, scale, tmp_path / "published.pth")
    count, values, shapes = layout
    assert len(state) == count and sum(v.numel() for v in state.values()) == values
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    trunk_class(scale).load_state_dict(state, strict=True)
    # The grey generator loads its converted state strictly too.
    generator = build_generator(name, scale)
    generator.load_state_dict(grey_state_dict(state, module.LAYOUT, generator), strict=True)


@pytest.mark.parametrize(("name", "scale", "module", "trunk_class", "layout"), PUBLISHED, ids=IDS)
def test_the_grey_network_equals_the_rgb_reference_on_a_grey_input(name, scale, module, trunk_class, layout,
                                                                   tmp_path: Path) -> None:
    state = random_published_checkpoint(trunk_class, scale, tmp_path / "published.pth")
    reference = trunk_class(scale)
    reference.load_state_dict(state, strict=True)
    generator = build_generator(name, scale)
    generator.load_state_dict(grey_state_dict(state, module.LAYOUT, generator), strict=True)
    x = torch.cat([grey_image(), grey_image(seed=1)])
    with torch.no_grad():
        expected = rgb_reference_output(reference.eval(), x, module.LAYOUT)
        got = generator.train()(x)  # unclamped: compare the networks, not the clamp
    assert got.shape == (2, 1, 29 * scale, 34 * scale)
    assert float((got - expected).abs().max()) <= 1e-5
    # The reference does depend on the colours (the test would pass for a colour-blind reference otherwise).
    rgb = module.LAYOUT.input_range * (x.expand(-1, 3, -1, -1)
                                       - torch.tensor(module.LAYOUT.rgb_mean).view(1, 3, 1, 1))
    with torch.no_grad():
        colours = reference(rgb) / module.LAYOUT.output_range
    assert float((colours[:, 0] - colours[:, 2]).abs().max()) > 1e-3


def test_the_conversion_refuses_a_checkpoint_that_is_not_rgb() -> None:
    generator = build_generator("rlfn", 4)
    grey = {key.removeprefix("trunk."): value for key, value in generator.state_dict().items()
            if key.startswith("trunk.")}
    with pytest.raises(ValueError, match=r"conv_1.weight has 1 input channels, expected 3"):
        grey_state_dict(grey, rlfn.LAYOUT, generator)
