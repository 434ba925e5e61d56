"""Checkpoints: atomic writes, safe loads, architecture checks, and loading a generator.

A checkpoint is a plain dict of tensors and built-in containers/scalars, so it loads with
``torch.load(weights_only=True)`` (no arbitrary pickle). Two files per run directory:

* ``last.pt``: everything needed to continue the run (model, optimisers, scalers, RNG states,
  step, history, best score, early-stopping counter);
* kept checkpoints (generator weights, the validation that chose them, their ``phase`` and
  ``step``): ``best.pt``, the one the benchmark, registry and serving load through
  :func:`load_generator`; for a GAN also ``warmup.pt`` (best of the pixel warm-up) and
  ``adversarial.pt`` (best perceptual score above the fidelity floor), see
  :mod:`medsr.training.trainer`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsr.atomic import atomic_path
from medsr.models import build_generator

CHECKPOINT_FORMAT = "medsr-checkpoint/1"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
WARMUP_NAME = "warmup.pt"
ADVERSARIAL_NAME = "adversarial.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or belongs to another model, scale or architecture."""


def architecture_fingerprint(model_name: str, scale: int, generator: nn.Module) -> str:
    """Hash of the model name, scale and every state-dict entry's name and shape."""
    layout = [model_name, int(scale), [[k, list(v.shape)] for k, v in sorted(generator.state_dict().items())]]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain lists (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def assert_finite_parameters(module: nn.Module, what: str) -> None:
    """Refuse to save a model with NaN/inf weights."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{what}: parameter {name} is not finite; refusing to save it")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (a crash leaves the previous file intact)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, foreign pickle: one clear line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a MedSR checkpoint ({type(exc).__name__}: {reason}); "
            "delete it to start the run afresh"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path} is not a MedSR checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    return payload


def describe(model: str, scale: int, options: dict[str, Any]) -> str:
    return f"{model} x{scale}" + (f" {options}" if options else "")


def check_compatible(payload: dict[str, Any], path: str | Path, *, model: str, scale: int,
                     options: dict[str, Any], fingerprint: str) -> None:
    """Raise CheckpointError naming the checkpoint, the expected and the found model."""
    found = describe(payload.get("model", "?"), payload.get("scale", 0), payload.get("model_options") or {})
    expected = describe(model, scale, options)
    same_options = (payload.get("model_options") or {}) == options
    if payload.get("model") != model or payload.get("scale") != scale or not same_options:
        raise CheckpointError(f"checkpoint {path} holds {found}, but this run expects {expected}")
    if payload.get("fingerprint") != fingerprint:
        raise CheckpointError(f"checkpoint {path} holds {found} with architecture {payload.get('fingerprint')}, "
                              f"but the current code builds {fingerprint} (the model definition changed)")


def load_generator(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The generator stored in a ``best.pt``/``last.pt`` checkpoint, in eval mode on ``device``."""
    payload = load_checkpoint(checkpoint_path)
    try:
        name, scale, options = payload["model"], int(payload["scale"]), dict(payload.get("model_options") or {})
        state = payload["generator"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {checkpoint_path} lacks {exc.args[0]!r}") from None
    generator = build_generator(name, scale, **options)
    check_compatible(payload, checkpoint_path, model=name, scale=scale, options=options,
                     fingerprint=architecture_fingerprint(name, scale, generator))
    generator.load_state_dict(state)
    return generator.to(device).eval()


def checkpoint_info(checkpoint_path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata without tensors: model, scale, options, ``step`` and ``phase``
    of the weights it holds (``pixel``, ``warmup`` or ``adversarial``), ``best_val_psnr`` (their
    mean validation PSNR over the tracks), ``feature_loss``, ``kind`` and, for kept checkpoints,
    ``selection`` (the rule that chose them and their scores) and ``val``.

    ``phase`` is None for a checkpoint written before phases were recorded.
    """
    payload = load_checkpoint(checkpoint_path)
    keys = ("model", "scale", "model_options", "fingerprint", "step", "phase", "best_val_psnr", "best_step",
            "profile", "feature_loss", "kind", "selection", "val", "bicubic_val")
    info = {k: payload[k] for k in keys if k in payload}
    info.setdefault("phase", None)
    return info
