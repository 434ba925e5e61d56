"""Training pairs degraded on the fly: a patch is what the whole tile's degradation gives there, and
the batches of a run are a pure function of (seed, step): the same for 1 and 2 DataLoader workers
and for a run resumed at step k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medsr import degradations as deg
from medsr.data.pairing import degrade_training_patch, patch_margin
from medsr.training import PatchBatches
from test_training import RECIPE, write_pair_sets

# No noise and a fixed blur: the patch and the whole tile's degradation must then agree exactly.
NOISELESS = {**RECIPE, "noise": {m: {"kind": "gaussian", "level": 0.0} for m in ("xray", "ct", "mri")},
             "train_range": {"clean_fraction": 0.0, "blur_sigma": [1.0, 1.0], "noise_factor": [0.0, 0.0]}}


def tile(side: int = 128) -> np.ndarray:
    return np.random.default_rng(0).random((1, side, side), dtype=np.float32)


@pytest.mark.parametrize("scale", [2, 4])
def test_a_standard_patch_is_the_whole_tiles_degradation_there(scale: int) -> None:
    hr = tile()
    whole = deg.degrade_standard(hr, scale, blur_sigma=1.0, noise_kind="gaussian", noise_level=0.0,
                                 rng=np.random.default_rng(0))
    for y, x in ((10, 7), (0, 0), (128 // scale - 8, 3)):  # inside, and against the tile's borders
        lr, target = degrade_training_patch(hr, "standard", scale, y, x, 8, modality="ct", recipe=NOISELESS,
                                            rng=np.random.default_rng(1))
        np.testing.assert_allclose(lr, whole[:, y:y + 8, x:x + 8], atol=2e-6)
        np.testing.assert_array_equal(target, hr[:, y * scale:(y + 8) * scale, x * scale:(x + 8) * scale])
    assert patch_margin("standard", scale, NOISELESS) >= 2


def test_an_ssl_patch_is_the_whole_tiles_vlr_and_lr_there() -> None:
    hr, scale = tile(), 2
    blur = {"blur_sigma": 1.0, "noise_kind": "gaussian", "noise_level": 0.0}
    lr_whole = deg.degrade_standard(hr, scale, rng=np.random.default_rng(0), **blur)
    vlr_whole = deg.degrade_vlr(lr_whole, scale, rng=np.random.default_rng(0), **blur)
    vlr, target = degrade_training_patch(hr, "ssl", scale, 9, 12, 8, modality="mri", recipe=NOISELESS,
                                         rng=np.random.default_rng(1))
    np.testing.assert_allclose(target, lr_whole[:, 18:34, 24:40], atol=2e-6)
    np.testing.assert_allclose(vlr, vlr_whole[:, 9:17, 12:20], atol=2e-6)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_sets(tmp_path_factory.mktemp("tiles"), 2, hr_size=48, count=6)


def batches(root: Path, workers: int, first: int, kind: str, **options: Any) -> list[dict[str, Any]]:
    dataset = PatchBatches(root, kind=kind, target_scale=2, batch_size=4, lr_patch=6, seed=11, first_step=first,
                           last_step=6, total_steps=6, **options)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        multiprocessing_context="forkserver" if workers else None)
    return list(loader)


def assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["lr"], y["lr"]) and torch.equal(x["hr"], y["hr"]), x["step"]


@pytest.mark.parametrize(("kind", "options"), [("standard", {"clean_fraction": 0.3}), ("blind", {"blind_fraction": 0.5}),
                                               ("ssl", {})])
def test_the_same_batches_for_one_and_two_workers_and_after_a_resume(pairs_root: Path, kind: str,
                                                                     options: dict[str, Any]) -> None:
    one = batches(pairs_root, 1, 1, kind, **options)
    assert len(one) == 6 and one[0]["lr"].shape == (4, 1, 6, 6) and one[0]["hr"].shape == (4, 1, 12, 12)
    assert_same(one, batches(pairs_root, 2, 1, kind, **options))
    assert_same(one[3:], batches(pairs_root, 0, 4, kind, **options))  # resumed after step 3
    # Fresh draws every step: no two batches (nor two patches of one) share their LR.
    lrs = torch.cat([b["lr"] for b in one])
    assert len({lr.numpy().tobytes() for lr in lrs}) == len(lrs)
