"""Training under MLflow: the trainer's per-validation history becomes MLflow metrics, and the
best generator, a comparison figure and the feature-loss choice are logged with the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from medsr.data.pairs import PairSet
from medsr.training.checkpoint import load_generator
from medsr.training.config import TrainConfig
from medsr.training.trainer import predict_image, train_generator


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    metrics = {f"loss_{name}": float(value) for name, value in entry["losses"].items()}
    metrics.update(val_psnr=float(entry["val_psnr"]), val_ssim=float(entry["val_ssim"]),
                   best_val_psnr=float(entry["best_val_psnr"]), train_scale=float(entry["scale"]))
    for modality, scores in entry.get("val_per_modality", {}).items():
        metrics[f"val_psnr_{modality}"] = float(scores["psnr"])
        metrics[f"val_ssim_{modality}"] = float(scores["ssim"])
    return metrics


def train_tracked(config: TrainConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Train ``config`` inside an MLflow run; returns what the train stage records in its metrics."""
    import mlflow

    from medsr import tracking
    from medsr.models import build_generator

    started = time.perf_counter()
    tags = {"model": config.model, "scale": str(config.scale), "profile": config.profile}
    logged_params = {"train": config.to_dict(), "degrade": params.get("degrade", {}), "seed": params.get("seed")}
    with tracking.training_run(f"{config.model}-x{config.scale}", logged_params, tags) as run:
        result = train_generator(config, on_epoch=lambda entry: mlflow.log_metrics(_metrics_of(entry), step=int(entry["step"])))
        mlflow.set_tags({"feature_loss": result.feature_loss_used, "device": result.device,
                         "resumed_from_step": str(result.resumed_from_step), "stopped_early": str(result.stopped_early)})
        if result.best_checkpoint is None:
            raise RuntimeError(f"{config.model} x{config.scale}: training ended without a validated checkpoint")
        generator = load_generator(result.best_checkpoint)
        val = PairSet(Path(config.pairs_root) / "val" / f"x{config.scale}" / "standard")
        lr, hr = val.lr(0), val.hr(0)
        bicubic = predict_image(build_generator("bicubic", config.scale), lr)
        figure = tracking.comparison_figure(lr, bicubic, predict_image(generator, lr), hr,
                                            f"{config.model} x{config.scale} ({val.pairs[0]['modality']}, val)")
        mlflow.log_figure(figure, "comparison.png")
        example = np.stack([val.lr(0)[:, :16, :16]] * 2)  # batch of 2: a batch of 1 would look fixed-size
        model_uri = tracking.log_generator(generator, example, {"model": config.model, "scale": config.scale,
                                                                "options": dict(config.model_options)})
        mlflow.log_metrics({"final_best_val_psnr": float(result.best_val_psnr), "steps_done": float(result.steps_done),
                            "train_seconds": time.perf_counter() - started})
        return {
            "run_id": run.info.run_id,
            "model_uri": model_uri,
            "best_val_psnr": round(float(result.best_val_psnr), 4),
            "best_step": result.best_step,
            "steps_done": result.steps_done,
            "resumed_from_step": result.resumed_from_step,
            "stopped_early": result.stopped_early,
            "feature_loss": result.feature_loss_used,
            "seconds": round(time.perf_counter() - started, 1),
        }
