"""The `train@<model>` DVC stage as a function: one model at every scale, tracked in MLflow."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from medsr.atomic import write_json, write_text
from medsr.params import section
from medsr.pipeline import METRICS_DIR, StageFailed

MODELS_DIR = Path("models")
TRAINED_MODELS: tuple[str, ...] = ("espcn", "srgan", "swift_srgan", "brainsr", "blimsr", "residual_cnn")


def _config_digest(config: Any) -> str:
    relevant = {k: v for k, v in config.to_dict().items() if k not in ("resume", "quiet", "num_workers", "device")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_stage(params: dict[str, Any], model: str, *, profile: str | None = None) -> dict[str, Any]:
    """Train ``model`` at every scale in degrade.scales, tracked in MLflow; resumes a killed run."""
    from medsr.models import MODEL_NAMES
    from medsr.training import TrainConfig
    from medsr.training.tracked import train_tracked

    if model not in TRAINED_MODELS:
        raise StageFailed(f"unknown model {model!r}: choose one of {', '.join(TRAINED_MODELS)}"
                          + (" (bicubic is the untrained baseline)" if model in MODEL_NAMES else ""))
    results: dict[str, Any] = {}
    for scale in section(params, "degrade.scales"):
        config = TrainConfig.from_params(params, model, int(scale), profile=profile)
        out_dir = Path(config.out_dir)
        marker = out_dir / "config.sha256"
        digest = _config_digest(config)
        # models/<name> persists across `dvc repro` so a killed run resumes; a changed config must not.
        if marker.is_file() and marker.read_text().strip() != digest:
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(marker, digest + "\n")
        results[f"x{scale}"] = train_tracked(config, params)
    summary = {"model": model, "scales": results}
    write_json(METRICS_DIR / "train" / f"{model}.json", summary)
    return summary
