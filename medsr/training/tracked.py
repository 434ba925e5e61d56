"""Training under MLflow: the trainer's per-validation history becomes MLflow metrics, and the
shipped generator (best.pt), a comparison figure, the feature-loss choice and the phase and step
of every kept checkpoint are logged with the run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medsr.data.pairs import PairSet
from medsr.inference import Upscaler
from medsr.perceptual import PERCEPTUAL_METRIC
from medsr.training.checkpoint import load_generator
from medsr.training.config import TrainConfig
from medsr.training.data import validation_tracks
from medsr.training.trainer import train_generator


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    metrics = {f"loss_{name}": float(value) for name, value in entry["losses"].items()}
    metrics.update(val_psnr=float(entry["val_psnr"]), val_ssim=float(entry["val_ssim"]),
                   val_gain_db=float(entry["val_gain_db"]), best_val_psnr=float(entry["best_val_psnr"]),
                   train_scale=float(entry["scale"]), adversarial_phase=float(entry["phase"] == "adversarial"))
    metrics[f"val_{PERCEPTUAL_METRIC}"] = float(entry[PERCEPTUAL_METRIC])
    for track, scores in entry["val"].items():
        metrics[f"val_psnr_{track}"] = float(scores["psnr"])
        metrics[f"val_ssim_{track}"] = float(scores["ssim"])
        metrics[f"val_{PERCEPTUAL_METRIC}_{track}"] = float(scores[PERCEPTUAL_METRIC])
        metrics[f"bicubic_val_psnr_{track}"] = float(entry["bicubic_val"][track]["psnr"])
        for modality, per in scores.get("per_modality", {}).items():
            metrics[f"val_psnr_{track}_{modality}"] = float(per["psnr"])
    for name, value in (entry.get("raw") or {}).items():  # raw weights beside the EMA ones
        if isinstance(value, (int, float)):
            metrics[f"raw_{name}"] = float(value)
    return metrics


def _kept_summary(checkpoints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What metrics/train/<model>.json records of each kept checkpoint."""
    keys = ("file", "phase", "step", "rule", "weights", "val_psnr", "val_gain_db", PERCEPTUAL_METRIC,
            "above_fidelity_floor", "val_psnr_per_track")
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 4)
        return {k: rounded(v) for k, v in value.items()} if isinstance(value, dict) else value

    return {name: {k: rounded(v) for k, v in record.items() if k in keys} for name, record in sorted(checkpoints.items())}


def train_tracked(config: TrainConfig, params: dict[str, Any], extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``config`` inside an MLflow run (``extra_tags`` added to its tags, e.g. the exact data
    version of the pairs read); returns what the train stage records in its metrics."""
    import mlflow

    from medsr import tracking
    from medsr.models import build_generator

    started = time.perf_counter()
    tags = {"model": config.model, "scale": str(config.scale), "profile": config.profile, **(extra_tags or {})}
    # Where published starting weights came from and under which licence: the registry's model card reads these.
    tags.update({f"init_{key}": str(value) for key, value in (config.init or {}).items()})
    logged_params = {"train": config.to_dict(), "degrade": params.get("degrade", {}), "seed": params.get("seed")}
    with tracking.training_run(f"{config.model}-x{config.scale}", logged_params, tags) as run:
        result = train_generator(config, on_epoch=lambda entry: mlflow.log_metrics(_metrics_of(entry), step=int(entry["step"])))
        kept = _kept_summary(result.checkpoints)
        phase_tags = {f"{name}_phase": record["phase"] for name, record in kept.items()}
        phase_tags.update({f"{name}_step": str(record["step"]) for name, record in kept.items()})
        mlflow.set_tags({"feature_loss": result.feature_loss_used, "device": result.device,
                         "resumed_from_step": str(result.resumed_from_step), "stopped_early": str(result.stopped_early),
                         "perceptual_metric": PERCEPTUAL_METRIC, "validation_tracks": ",".join(result.extra["tracks"]),
                         **phase_tags})
        if result.best_checkpoint is None:
            raise RuntimeError(f"{config.model} x{config.scale}: training ended without a validated checkpoint")
        generator = load_generator(result.best_checkpoint)
        val = PairSet(next(iter(validation_tracks(config.pairs_root, config.scale).values())))
        lr, hr = val.lr(0), val.hr(0)
        bicubic = Upscaler(build_generator("bicubic", config.scale), config.scale).network(lr)
        # The network alone, as validation scored it (the consistency step is not a training param).
        figure = tracking.comparison_figure(lr, bicubic, Upscaler(generator, config.scale).network(lr), hr,
                                            f"{config.model} x{config.scale} ({val.pairs[0]['modality']}, val "
                                            f"{val.folder.name}, {result.best_phase} step {result.best_step})")
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
            "best_phase": result.best_phase,
            "checkpoints": kept,  # phase and step of every kept checkpoint (best, warmup, adversarial)
            "bicubic_val_psnr": {t: round(v["psnr"], 4) for t, v in result.bicubic_val.items()},
            "perceptual_metric": PERCEPTUAL_METRIC,
            "feature_loss": result.feature_loss_used,
            "seconds": round(time.perf_counter() - started, 1),
        }
