"""The noise-gated pair (medsr.models.gated): what it computes, how it tiles, how it trains and loads.

The published weights here are random ones in the published layout (tests/test_pretrained.py), so
every test runs without the real files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medsr.finetune import interpolated
from medsr.inference import Tiling, Upscaler, predict_image
from medsr.models import NoiseGated, build_generator
from medsr.models import rlfn
from medsr.models.gated import GateWeighted

GATE = {"threshold": 0.005, "exponent": 8.0}


def smooth(seed: int, side: int) -> np.ndarray:
    from test_training import smooth_image

    return smooth_image(np.random.default_rng(seed), side)


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, sigma, image.shape), 0, 1).astype(np.float32)


def distinct_pair(name: str = "espcn", scale: int = 2, **gate: float) -> NoiseGated:
    """A gated pair whose branches differ (a fresh pair starts them equal only after load_start)."""
    torch.manual_seed(0)
    pair = build_generator(name, scale, noise_gate={**GATE, **gate})
    with torch.no_grad():
        for p in pair.tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pair.eval()


def test_the_option_builds_a_pair_and_bad_gates_are_refused() -> None:
    pair = build_generator("espcn", 4, noise_gate=GATE)
    assert isinstance(pair, NoiseGated) and pair.scale == 4
    assert not any(p.requires_grad for p in pair.published.parameters())
    assert all(p.requires_grad for p in pair.tuned.parameters())
    assert set(pair.state_dict()) == ({f"published.{k}" for k in pair.published.state_dict()}
                                      | {f"tuned.{k}" for k in pair.tuned.state_dict()} | {"input_center"})
    with pytest.raises(ValueError, match="missing \\['exponent'\\]"):
        build_generator("espcn", 4, noise_gate={"threshold": 0.005})
    with pytest.raises(ValueError, match="unknown keys \\['treshold'\\]"):
        build_generator("espcn", 4, noise_gate={**GATE, "treshold": 1})
    with pytest.raises(ValueError, match="tuned_share must be in"):
        build_generator("espcn", 4, noise_gate={**GATE, "tuned_share": 1.5})


def test_clean_input_gets_the_published_branch_noisy_the_tuned_one_and_between_a_blend() -> None:
    pair = distinct_pair()
    clean = smooth(1, 40)
    loud = noisy(clean, 0.02, 2)
    middle = noisy(clean, 0.005, 3)
    np.testing.assert_array_equal(predict_image(pair, clean), predict_image(pair.published, clean))
    np.testing.assert_array_equal(predict_image(pair, loud), predict_image(pair.tuned, loud))
    w = pair.weight(middle)
    assert 0.05 < w < 0.95
    expected = w * predict_image(pair.published, middle) + (1 - w) * predict_image(pair.tuned, middle)
    np.testing.assert_allclose(predict_image(pair, middle), expected, atol=1e-5)
    # A batch is gated per image: the clean and the noisy image in one forward pass keep their own branches.
    batch = torch.from_numpy(np.stack([clean, loud]))
    with torch.inference_mode():
        out = pair(batch).numpy()
    np.testing.assert_allclose(out[0], predict_image(pair.published, clean), atol=1e-6)
    np.testing.assert_allclose(out[1], predict_image(pair.tuned, loud), atol=1e-6)


def test_in_training_the_pair_is_its_tuned_branch() -> None:
    pair = distinct_pair().train()
    x = torch.from_numpy(smooth(4, 16))[None]
    assert pair.published.training is False
    torch.testing.assert_close(pair(x), pair.tuned(x))
    pair(x).mean().backward()
    assert all(p.grad is None for p in pair.published.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in pair.tuned.parameters())


def test_tuned_share_interpolates_the_weights_from_the_published_ones() -> None:
    pair = distinct_pair(tuned_share=0.5)
    loud = noisy(smooth(5, 32), 0.02, 6)
    halfway = interpolated(pair.published, pair.tuned, 0.5)
    np.testing.assert_allclose(predict_image(pair, loud), predict_image(halfway, loud), atol=1e-6)
    assert not np.allclose(predict_image(pair, loud), predict_image(pair.tuned, loud), atol=1e-4)


def test_tiles_share_their_image_s_gate_weight() -> None:
    # Noise on one half only: a tile's own estimate would pick another branch than the whole image's.
    pair = distinct_pair()
    image = smooth(7, 64)
    image[:, :, 32:] = noisy(image[:, :, 32:], 0.02, 8)
    whole = Upscaler(pair, 2).network(image)
    tiled = Upscaler(pair, 2, tiling=Tiling(tile=16, batch_size=3)).network(image)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert isinstance(pair.for_image(image), GateWeighted)
    assert pair.for_image(image).weight == pytest.approx(pair.weight(image))


def published_init(tmp_path: Path, scale: int = 2) -> dict:
    from test_pretrained import init_for, random_published_checkpoint

    (tmp_path / "pretrained").mkdir(exist_ok=True)
    path = tmp_path / "pretrained" / f"rlfn_x{scale}.pth"
    random_published_checkpoint(rlfn.RLFNTrunk, scale, path)
    return {**init_for().as_dict(), "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_training_a_gated_model_tunes_one_branch_keeps_the_published_one_and_reloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_training import write_pair_sets

    from medsr.pretrained import load_published
    from medsr.training import TrainConfig, load_generator, train_generator

    monkeypatch.chdir(tmp_path)
    pairs = write_pair_sets(tmp_path / "pairs", 2, hr_size=48, kinds=("standard",))
    init = published_init(tmp_path)
    config = TrainConfig(model="rlfn", scale=2, pairs_root=str(pairs), out_dir=str(tmp_path / "out"), steps=3,
                         batch_size=2, lr_patch=16, lr_generator=1e-3, val_every=3, checkpoint_every=3, quiet=True,
                         init=init, ema_decay=0.5, model_options={"noise_gate": {**GATE, "tuned_share": 0.875}})
    train_generator(config)
    published = load_published("rlfn", 2, tmp_path / "pretrained" / "rlfn_x2.pth").state_dict()
    for kept in ("last.pt", "best.pt"):
        trained = load_generator(tmp_path / "out" / kept)
        assert isinstance(trained, NoiseGated) and trained.tuned_share == 0.875
        branch = trained.published.state_dict()
        assert all(torch.equal(branch[k], published[k]) for k in published), kept
        tuned = trained.tuned.state_dict()
        assert max(float((tuned[k] - published[k]).abs().max()) for k in published) > 1e-4, kept
    # Without the weights it started from, the gate has nothing to gate against.
    with pytest.raises(ValueError, match="noise_gate gates a fine-tune against the weights it started from"):
        train_generator(TrainConfig(**{**config.to_dict(), "init": None, "out_dir": str(tmp_path / "out2")}))


def test_a_logged_pair_loads_back_as_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsr.tracking import load_logged_generator, log_generator

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("gated", artifact_location=(tmp_path / "artifacts").resolve().as_uri())
    pair = distinct_pair(tuned_share=0.75)
    example = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    spec = {"model": "espcn", "scale": 2, "options": {"noise_gate": {**GATE, "tuned_share": 0.75}}}
    with mlflow.start_run(experiment_id=experiment):
        uri = log_generator(pair, example, spec)
    loaded, _ = load_logged_generator(uri)
    image = noisy(smooth(9, 32), 0.005, 10)
    np.testing.assert_array_equal(predict_image(loaded, image), predict_image(pair, image))
