"""Tests for medsr.degradations: shapes, contract, purity, determinism and noise/resize physics."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from medsr import degradations as deg
from medsr.data import ContractError, check_contract

BLIND_PARAMS = dict(blur_sigma=(0.2, 2.0), resize_factor=(0.7, 1.3), noise_level=(0.0, 0.03),
                    jpeg_quality=(60, 95))
STANDARD_PARAMS = dict(blur_sigma=0.6, noise_kind="poisson", noise_level=0.01)


def digest(img: np.ndarray) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / mse)


def high_frequency_power(img: np.ndarray) -> float:
    """Spectral power above a quarter of the sampling rate (radial)."""
    spectrum = np.abs(np.fft.fft2(img[0] - img[0].mean())) ** 2
    fy = np.fft.fftfreq(img.shape[1])[:, None]
    fx = np.fft.fftfreq(img.shape[2])[None, :]
    return float(spectrum[np.hypot(fy, fx) > 0.25].sum())


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    """A non-square (96 x 136) smooth image with an edge and fine texture, like a windowed slice."""
    yy, xx = np.mgrid[0:96, 0:136].astype(np.float64)
    image = (0.3 + 0.4 * xx / 136 + 0.2 * ((yy - 48) ** 2 + (xx - 68) ** 2 < 30**2)
             + 0.05 * np.sin(xx / 3) * np.cos(yy / 5))
    image = np.clip(image, 0.0, 1.0).astype(np.float32)[None]
    check_contract(image)
    return image


def stochastic_ops(scale: int = 2) -> dict[str, object]:
    """Every random op as a function of (image, rng)."""
    return {
        "gaussian": lambda x, r: deg.add_gaussian_noise(x, 0.05, r),
        "poisson": lambda x, r: deg.add_poisson_noise(x, 0.05, r),
        "rician": lambda x, r: deg.add_rician_noise(x, 0.05, r),
        "modality": lambda x, r: deg.add_modality_noise(x, "rician", 0.02, r),
        "standard": lambda x, r: deg.degrade_standard(x, scale, rng=r, **STANDARD_PARAMS),
        "blind": lambda x, r: deg.degrade_blind(x, scale, rng=r, **BLIND_PARAMS),
        "vlr": lambda x, r: deg.degrade_vlr(x, scale, rng=r, **STANDARD_PARAMS),
    }


def all_ops() -> dict[str, object]:
    """Every public op as a function of (image, rng), deterministic ones ignoring rng."""
    return {
        **stochastic_ops(),
        "crop": lambda x, r: deg.crop_to_multiple(x, 5),
        "blur": lambda x, r: deg.gaussian_blur(x, 1.5),
        "resize": lambda x, r: deg.resize_bicubic(x, (50, 70)),
        "resize_no_aa": lambda x, r: deg.resize_bicubic(x, (50, 70), antialias=False),
        "bicubic": lambda x, r: deg.degrade_bicubic(x, 4),
        "upsample": lambda x, r: deg.upsample_bicubic(x, 2),
        "jpeg": lambda x, r: deg.jpeg_compress(x, 30),
    }


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("scale", [2, 4])
def test_shapes_on_non_square_images(phantom: np.ndarray, scale: int) -> None:
    h, w = phantom.shape[1:]
    low = (1, h // scale, w // scale)
    assert deg.degrade_bicubic(phantom, scale).shape == low
    assert deg.degrade_standard(phantom, scale, rng=deg.rng_for(0), **STANDARD_PARAMS).shape == low
    assert deg.degrade_blind(phantom, scale, rng=deg.rng_for(0), **BLIND_PARAMS).shape == low
    assert deg.upsample_bicubic(deg.degrade_bicubic(phantom, scale), scale).shape == phantom.shape
    lr = deg.crop_to_multiple(deg.degrade_bicubic(phantom, scale), scale)
    vlr = deg.degrade_vlr(lr, scale, rng=deg.rng_for(0), **STANDARD_PARAMS)
    assert vlr.shape == (1, lr.shape[1] // scale, lr.shape[2] // scale)


def test_crop_to_multiple_keeps_top_left(phantom: np.ndarray) -> None:
    cropped = deg.crop_to_multiple(phantom[:, :93, :131], 4)
    assert cropped.shape == (1, 92, 128)
    np.testing.assert_array_equal(cropped, phantom[:, :92, :128])
    assert cropped.flags.c_contiguous


def test_resize_bicubic_hits_requested_size(phantom: np.ndarray) -> None:
    assert deg.resize_bicubic(phantom, (37, 211)).shape == (1, 37, 211)


# --------------------------------------------------------------------------- contract and purity


@pytest.mark.parametrize("name", sorted(all_ops()))
def test_outputs_satisfy_contract(phantom: np.ndarray, name: str) -> None:
    # Extremes (0 and 1) are where noise and bicubic overshoot would leave [0, 1].
    image = phantom.copy()
    image[:, :8] = 0.0
    image[:, -8:] = 1.0
    out = all_ops()[name](image, deg.rng_for(7, name))
    check_contract(out, name)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(all_ops()))
def test_ops_are_pure(phantom: np.ndarray, name: str) -> None:
    image = phantom.copy()
    before = digest(image)
    out = all_ops()[name](image, deg.rng_for(7, name))
    assert digest(image) == before, f"{name} modified its input"
    assert not np.shares_memory(out, image), f"{name} returned a view of its input"


@pytest.mark.parametrize("level_zero_op", [
    lambda x: deg.gaussian_blur(x, 0.0),
    lambda x: deg.add_gaussian_noise(x, 0.0, deg.rng_for(0)),
    lambda x: deg.add_poisson_noise(x, 0.0, deg.rng_for(0)),
    lambda x: deg.add_rician_noise(x, 0.0, deg.rng_for(0)),
    lambda x: deg.add_modality_noise(x, "none", 0.5, deg.rng_for(0)),
])
def test_zero_strength_returns_a_copy(phantom: np.ndarray, level_zero_op) -> None:
    out = level_zero_op(phantom)
    np.testing.assert_array_equal(out, phantom)
    assert not np.shares_memory(out, phantom)


@pytest.mark.parametrize("bad", [
    np.zeros((8, 8), np.float32),  # no channel axis
    np.zeros((1, 8, 8), np.float64),  # wrong dtype
    np.full((1, 8, 8), 1.5, np.float32),  # out of range
])
def test_non_contract_input_is_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ContractError):
        deg.gaussian_blur(bad, 1.0)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", sorted(stochastic_ops()))
def test_same_seed_same_bytes_other_seed_other_bytes(phantom: np.ndarray, name: str) -> None:
    op = stochastic_ops()[name]
    first = op(phantom, deg.rng_for(2024, "case-1", 2))
    again = op(phantom, deg.rng_for(2024, "case-1", 2))
    other = op(phantom, deg.rng_for(2025, "case-1", 2))
    assert digest(first) == digest(again)
    assert digest(first) != digest(other)


def test_rng_for_derivation_is_pinned() -> None:
    # Hardcoded: a change of the derivation (hash, encoding, bit generator) changes every pair set.
    assert deg.rng_for(2024, "ct", 4).bit_generator.random_raw() == 14985034939977150133


def test_rng_for_separates_keys() -> None:
    def first_draw(*args: str | int) -> int:
        return int(deg.rng_for(*args).bit_generator.random_raw())

    draws = [first_draw(1), first_draw(1, "a", "b"), first_draw(1, "ab"), first_draw(1, 1),
             first_draw(1, "1"), first_draw(2)]
    assert len(set(draws)) == len(draws)
    with pytest.raises(TypeError):
        deg.rng_for(1, 1.5)  # type: ignore[arg-type]


def test_blind_differs_from_standard(phantom: np.ndarray) -> None:
    blind = deg.degrade_blind(phantom, 4, rng=deg.rng_for(3), **BLIND_PARAMS)
    standard = deg.degrade_standard(phantom, 4, rng=deg.rng_for(3), **STANDARD_PARAMS)
    assert blind.shape == standard.shape
    assert float(np.abs(blind - standard).mean()) > 1e-3


def test_blind_with_fixed_parameters_is_the_two_round_chain(phantom: np.ndarray) -> None:
    # Degenerate ranges pin every random parameter (noise off), exposing the chain's structure.
    fixed = dict(blur_sigma=(1.2, 1.2), resize_factor=(0.8, 0.8), noise_level=(0.0, 0.0),
                 jpeg_quality=(70, 70))
    expected = phantom
    for _ in range(2):
        expected = deg.gaussian_blur(expected, 1.2)
        size = (round(expected.shape[1] * 0.8), round(expected.shape[2] * 0.8))
        expected = deg.jpeg_compress(deg.resize_bicubic(expected, size), 70)
    expected = deg.resize_bicubic(expected, (96 // 4, 136 // 4))
    blind = deg.degrade_blind(phantom, 4, rng=deg.rng_for(4), **fixed)
    assert digest(blind) == digest(expected)


def test_vlr_is_the_standard_operator_applied_to_lr(phantom: np.ndarray) -> None:
    lr = deg.degrade_standard(phantom, 2, rng=deg.rng_for(5, "lr"), **STANDARD_PARAMS)
    vlr = deg.degrade_vlr(lr, 2, rng=deg.rng_for(5, "vlr"), **STANDARD_PARAMS)
    expected = deg.degrade_standard(lr, 2, rng=deg.rng_for(5, "vlr"), **STANDARD_PARAMS)
    assert digest(vlr) == digest(expected)


# --------------------------------------------------------------------------- noise statistics


def test_gaussian_noise_std() -> None:
    flat = np.full((1, 256, 256), 0.5, np.float32)
    noisy = deg.add_gaussian_noise(flat, 0.05, deg.rng_for(11))
    assert abs(float(noisy.mean()) - 0.5) < 1e-3
    assert float(noisy.std()) == pytest.approx(0.05, rel=0.03)


def test_poisson_noise_grows_with_signal() -> None:
    level = 0.05
    rng = deg.rng_for(12)
    variances = {}
    for value in (0.2, 0.8):
        flat = np.full((1, 256, 256), value, np.float32)
        noisy = deg.add_poisson_noise(flat, level, rng)
        assert abs(float(noisy.mean()) - value) < 2e-3  # unbiased
        variances[value] = float(noisy.var())
        # peak = 1 / level**2 photons at 1.0, so variance = value * level**2.
        assert variances[value] == pytest.approx(value * level**2, rel=0.05)
    assert variances[0.8] > variances[0.2]


def test_rician_noise_on_background_is_rayleigh() -> None:
    sigma = 0.05
    zeros = np.zeros((1, 256, 256), np.float32)
    noisy = deg.add_rician_noise(zeros, sigma, deg.rng_for(13))
    assert noisy.min() >= 0.0
    assert float(noisy.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)


def test_modality_noise_dispatches(phantom: np.ndarray) -> None:
    for kind, fn in [("gaussian", deg.add_gaussian_noise), ("poisson", deg.add_poisson_noise),
                     ("rician", deg.add_rician_noise)]:
        via_kind = deg.add_modality_noise(phantom, kind, 0.02, deg.rng_for(14))
        direct = fn(phantom, 0.02, deg.rng_for(14))
        assert digest(via_kind) == digest(direct), kind


# --------------------------------------------------------------------------- resize and blur


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_keeps_constant_images_constant(scale: int) -> None:
    flat = np.full((1, 48, 80), 0.37, np.float32)
    np.testing.assert_allclose(deg.degrade_bicubic(flat, scale), 0.37, atol=1e-6)
    np.testing.assert_allclose(deg.upsample_bicubic(flat, scale), 0.37, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 4])
def test_antialiasing_suppresses_stripe_aliasing(scale: int) -> None:
    # Stripes of period 3 pixels are above the Nyquist limit after downscaling by 2 or 4.
    stripes = np.zeros((1, 48, 96), np.float32)
    stripes[..., ::3] = 1.0
    size = (48 // scale, 96 // scale)
    smooth = deg.resize_bicubic(stripes, size, antialias=True)
    aliased = deg.resize_bicubic(stripes, size, antialias=False)
    assert float(smooth.std()) < 0.5 * float(aliased.std())
    assert float(smooth.mean()) == pytest.approx(1 / 3, abs=0.01)  # the true local average
    np.testing.assert_array_equal(deg.degrade_bicubic(stripes, scale), smooth)


@pytest.mark.parametrize("sigma", [0.6, 2.0])
def test_blur_reflects_at_borders(sigma: float) -> None:
    # A zero-padded blur would darken the borders of every image.
    flat = np.full((1, 40, 56), 0.8, np.float32)
    np.testing.assert_allclose(deg.gaussian_blur(flat, sigma), 0.8, atol=1e-6)


def test_blur_lowers_high_frequency_energy() -> None:
    noise = deg.rng_for(15).random((1, 64, 96), dtype=np.float32)
    powers = [high_frequency_power(deg.gaussian_blur(noise, s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert powers[0] > powers[1] > powers[2] > powers[3]
    assert powers[2] < 0.1 * powers[0]


# --------------------------------------------------------------------------- JPEG


def test_jpeg_quality_controls_fidelity(phantom: np.ndarray) -> None:
    high = psnr(phantom, deg.jpeg_compress(phantom, 95))
    low = psnr(phantom, deg.jpeg_compress(phantom, 10))
    assert high > 35.0
    assert low < high - 5.0


def test_jpeg_keeps_odd_sizes() -> None:
    image = np.full((1, 37, 53), 0.5, np.float32)
    assert deg.jpeg_compress(image, 50).shape == (1, 37, 53)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call", [
    lambda x: deg.degrade_bicubic(x, 4),
    lambda x: deg.degrade_standard(x, 4, rng=deg.rng_for(0), **STANDARD_PARAMS),
    lambda x: deg.degrade_blind(x, 4, rng=deg.rng_for(0), **BLIND_PARAMS),
    lambda x: deg.degrade_vlr(x, 4, rng=deg.rng_for(0), **STANDARD_PARAMS),
])
def test_indivisible_size_names_shape_and_scale(phantom: np.ndarray, call) -> None:
    with pytest.raises(ValueError, match=r"\(1, 97, 136\).*scale 4.*crop_to_multiple"):
        call(np.zeros((1, 97, 136), np.float32))


def test_unknown_noise_kind_lists_valid_kinds(phantom: np.ndarray) -> None:
    with pytest.raises(ValueError, match="'speckle'.*gaussian, poisson, rician, none"):
        deg.add_modality_noise(phantom, "speckle", 0.01, deg.rng_for(0))
    with pytest.raises(ValueError, match="'speckle'"):
        deg.degrade_standard(phantom, 2, blur_sigma=0.6, noise_kind="speckle", noise_level=0.01,
                             rng=deg.rng_for(0))


@pytest.mark.parametrize("call, message", [
    (lambda x: deg.gaussian_blur(x, -1.0), "sigma"),
    (lambda x: deg.add_poisson_noise(x, float("nan"), deg.rng_for(0)), "level"),
    (lambda x: deg.jpeg_compress(x, 0), "quality"),
    (lambda x: deg.degrade_bicubic(x, 0), "scale"),
    (lambda x: deg.crop_to_multiple(x[:, :3], 4), "smaller than 4"),
    (lambda x: deg.resize_bicubic(x, (0, 10)), "size"),
    (lambda x: deg.degrade_blind(x, 2, rng=deg.rng_for(0), **{**BLIND_PARAMS, "jpeg_quality": (95, 60)}),
     "jpeg_quality"),
])
def test_bad_arguments_name_the_problem(phantom: np.ndarray, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(phantom)


def test_registry_names_match_functions() -> None:
    assert {"degrade_standard", "degrade_blind", "degrade_vlr", "degrade_bicubic"} <= set(deg.DEGRADATIONS)
    for name, fn in deg.DEGRADATIONS.items():
        assert fn.__name__ == name and fn is getattr(deg, name)


# --------------------------------------------------------------------------- the pair builder's noise
# These go through medsr.data.pairing, the code that writes data/pairs, so a pipeline that reuses one
# noise field for every image, or adds noise before downsampling, fails here.

def _pair_params(noise_kind: str = "gaussian", level: float = 0.02, **extra: object) -> dict[str, object]:
    return {"seed": 7, "scales": [4], "blur_sigma": 0.6, "tracks": ["clean", "realistic"],
            "noise": {m: {"kind": noise_kind, "level": level} for m in ("xray", "ct", "mri")},
            "blind": {"blur_sigma": [0.2, 2.0], "resize_factor": [0.7, 1.3], "noise_level": [0.0, 0.03],
                      "jpeg_quality": [60, 95]}, **extra}


def _flat_pairs(tmp_path, kind: str, params: dict[str, object], n: int = 2, side: int = 256,
                value: float = 0.5):
    import pandas as pd

    from medsr.data.pairing import PairSource, make_pair

    rows = []
    for i in range(n):
        name = f"img{i}.npy"
        np.save(tmp_path / name, np.full((1, side, side), value, np.float32))
        rows.append({"id": f"xray-{i:04d}", "modality": "xray", "array": name, "split": "test"})
    return [make_pair(PairSource.of_row(tmp_path, row), scale=4, kind=kind, params=params)
            for row in pd.DataFrame(rows).itertuples()]


def test_two_images_get_independent_noise(tmp_path) -> None:
    first, second = _flat_pairs(tmp_path, "realistic", _pair_params())
    noise_a = (first.lr - 0.5).ravel()
    noise_b = (second.lr - 0.5).ravel()
    assert noise_a.std() > 0.01 and noise_b.std() > 0.01
    assert abs(float(np.corrcoef(noise_a, noise_b)[0, 1])) < 0.1  # 4096 samples: |r| ~ 0.016 by chance


def test_noise_is_added_in_lr_space_at_the_stated_level(tmp_path) -> None:
    # On a flat image, blur and antialiased downsampling change nothing; noise added after them keeps
    # its full standard deviation. Added before downsampling it would be averaged down ~scale-fold.
    for level in (0.01, 0.03):
        (pair,) = _flat_pairs(tmp_path, "realistic", _pair_params(level=level), n=1)
        core = pair.lr[0, 4:-4, 4:-4]
        assert core.std() == pytest.approx(level, rel=0.08)
        assert core.mean() == pytest.approx(0.5, abs=level / 10)


def test_clean_track_has_no_noise_and_no_blur(tmp_path) -> None:
    (pair,) = _flat_pairs(tmp_path, "clean", _pair_params(), n=1)
    assert np.array_equal(pair.lr, deg.degrade_bicubic(pair.hr, 4))


def test_a_written_pair_rebuilds_byte_exactly_from_its_seed_keys(tmp_path) -> None:
    import pandas as pd

    from medsr.data.pairing import build_pair_sets
    from medsr.data.pairs import PairSet

    rng = np.random.default_rng(3)
    rows = []
    for i in range(3):
        name = f"img{i}.npy"
        np.save(tmp_path / name, rng.random((1, 64, 72), dtype=np.float32))
        rows.append({"id": f"ct-{i}", "modality": "ct", "array": name, "split": "test"})
    params = _pair_params("poisson", 0.01, train_range={"clean_fraction": 0.3, "blur_sigma": [0.0, 1.0],
                                                         "noise_factor": [0.0, 2.0]})
    build_pair_sets(pd.DataFrame(rows), tmp_path, tmp_path / "pairs", params)
    stored = PairSet(tmp_path / "pairs" / "test" / "x4" / "realistic")
    i = 2
    key = stored.pairs[i]["id"]
    hr = deg.crop_to_multiple(np.load(tmp_path / f"img{i}.npy"), 4)
    rebuilt = deg.degrade_standard(hr, 4, blur_sigma=0.6, noise_kind="poisson", noise_level=0.01,
                                   rng=deg.rng_for(7, key, 4, "realistic"))
    assert rebuilt.tobytes() == stored.lr(i).tobytes()
    assert hr.tobytes() == stored.hr(i).tobytes()


def test_training_range_spans_clean_to_beyond_realistic() -> None:
    draws = [deg.draw_standard_parameters(deg.rng_for(1, k), clean_fraction=0.3, blur_sigma=(0.0, 1.0),
                                          noise_factor=(0.0, 2.0), noise_level=0.01) for k in range(2000)]
    clean = sum(d.blur_sigma == 0.0 and d.noise_level == 0.0 for d in draws) / len(draws)
    assert clean == pytest.approx(0.3, abs=0.04)
    assert max(d.noise_level for d in draws) > 0.015 and max(d.blur_sigma for d in draws) > 0.9
    with pytest.raises(ValueError, match="clean_fraction"):
        deg.draw_standard_parameters(deg.rng_for(1), clean_fraction=1.5, blur_sigma=(0, 1), noise_factor=(0, 2),
                                     noise_level=0.01)
