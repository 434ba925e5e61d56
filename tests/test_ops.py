"""medsr.ops: each fast path is the operator it implements (same taps, same border)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsr import ops


@pytest.mark.parametrize("shape", [(1, 96, 80), (1, 5, 7), (1, 2, 9), (1, 1, 1), (2, 3, 4)])
@pytest.mark.parametrize("sigma", [0.0, 0.6, 1.1, 2.0, 3.7])
def test_torch_blur_is_the_blur(shape: tuple[int, ...], sigma: float) -> None:
    """Images smaller than the kernel too: scipy reflects again past the far edge, and so do we."""
    image = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    fast = ops.gaussian_blur_fast(image, sigma)
    assert fast.dtype == np.float32
    assert fast.shape == image.shape
    np.testing.assert_allclose(fast, ops.gaussian_blur(image, sigma), rtol=0, atol=1e-6)


def test_the_blur_is_scipys_reflecting_gaussian() -> None:
    image = np.random.default_rng(1).random((1, 40, 33)).astype(np.float32)
    expected = ndimage.gaussian_filter(image, sigma=(0, 1.3, 1.3), mode="reflect")
    assert np.array_equal(ops.gaussian_blur(image, 1.3), expected)


def test_blur_taps_follow_scipys_radius_rule() -> None:
    assert ops.gaussian_taps(0.6).size == 2 * int(4 * 0.6 + 0.5) + 1
    assert ops.gaussian_taps(1.1).size == 2 * int(4 * 1.1 + 0.5) + 1
    assert abs(float(ops.gaussian_taps(2.0).sum()) - 1.0) < 1e-12


def test_reflect_indices_repeat_the_edge_sample() -> None:
    assert ops.reflect_indices(4, 3).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]
    assert ops.reflect_indices(1, 2).tolist() == [0, 0, 0, 0, 0]


def test_blur_refuses_a_negative_sigma() -> None:
    with pytest.raises(ValueError, match="sigma"):
        ops.gaussian_blur(np.zeros((1, 4, 4), np.float32), -1.0)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("shape", [(256, 256), (7, 5), (1, 1), (2, 3)])
def test_fast_upsampling_is_the_bicubic_upsampling(scale: int, shape: tuple[int, int]) -> None:
    """Every phase's 4 taps and the replicated edges of torch's kernel."""
    image = np.random.default_rng(scale).standard_normal(shape).astype(np.float32)
    expected = ops.bicubic_upsample(torch.from_numpy(image)[None, None], scale)[0, 0].numpy()
    fast = ops.bicubic_upsample_fast(image, scale)
    assert fast.dtype == np.float32
    assert fast.shape == expected.shape
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsampling_by_a_factor_is_the_resize_to_that_size(scale: int) -> None:
    """The generators' skip (a factor) and the degradations' baseline (a size) are one operator."""
    x = torch.rand(1, 1, 13, 9, generator=torch.Generator().manual_seed(scale))
    by_factor = ops.bicubic_upsample(x, scale)
    by_size = ops.bicubic_resize(x, (13 * scale, 9 * scale))
    assert torch.equal(by_factor, by_size)


def test_downsampling_is_the_antialiased_resize() -> None:
    x = torch.rand(1, 1, 24, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ops.bicubic_downsample(x, 4), ops.bicubic_resize(x, (6, 4), antialias=True))
