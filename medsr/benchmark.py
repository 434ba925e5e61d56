"""Benchmark: every trained model against bicubic on the test split's whole images.

One definition of the scores (README, "Metrics"): 1-channel, data range 1.0, a border of
``scale`` pixels cropped, the mean of per-image scores; SSIM with an 11-tap Gaussian window,
sigma 1.5 (scikit-image, as Wang et al.). Besides quality it reports parameters,
multiply-accumulates per output megapixel and CPU latency for a 256x256 input.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsr.atomic import atomic_path, write_json
from medsr.data.pairs import PairSet
from medsr.metrics import evaluate_pairs
from medsr.models import build_generator, count_parameters
from medsr.training.checkpoint import checkpoint_info, load_generator
from medsr.params import section
from medsr.pipeline import METRICS_DIR, PAIRS_DIR
from medsr.training.stage import MODELS_DIR, TRAINED_MODELS
from medsr.training.trainer import predict_image

LAYERS_WITH_MACS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def count_macs(model: nn.Module, lr_side: int = 32) -> int:
    """Multiply-accumulates of one forward pass on a ``lr_side`` square input (conv and linear layers).

    Hand-counted with forward hooks: the profilers that do this (thop, ptflops) are unmaintained.
    """
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            kernel = int(np.prod(module.kernel_size))
            total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYERS_WITH_MACS)]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 1, lr_side, lr_side, device=next(model.parameters(), torch.zeros(1)).device))
    finally:
        for handle in handles:
            handle.remove()
    return total


def macs_per_output_megapixel(model: nn.Module, scale: int, lr_side: int = 32) -> float:
    return count_macs(model, lr_side) / ((lr_side * scale) ** 2 / 1e6)


def cpu_latency_ms(model: nn.Module, side: int = 256, repeats: int = 3) -> float:
    """Median wall time of one forward pass on a ``side`` x ``side`` LR input, on the CPU."""
    model = model.to("cpu").eval()
    x = torch.rand(1, 1, side, side)
    with torch.inference_mode():
        model(x)  # warm-up: first call allocates and picks kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _scores(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    scores = {m: {"psnr": v["psnr"], "ssim": v["ssim"], "count": v["count"]} for m, v in result["per_modality"].items()}
    scores["all"] = {"psnr": result["psnr"], "ssim": result["ssim"], "count": result["count"]}
    return scores


def evaluation_indices(pairs: PairSet, max_per_modality: int | None) -> list[int] | None:
    """Every pair, or at most ``max_per_modality`` evenly spaced pairs of each modality (quick runs)."""
    if max_per_modality is None:
        return None
    chosen: list[int] = []
    for modality in pairs.modalities():
        members = [i for i, p in enumerate(pairs.pairs) if p["modality"] == modality]
        picks = np.linspace(0, len(members) - 1, min(max_per_modality, len(members))).round().astype(int)
        chosen += [members[i] for i in sorted(set(picks.tolist()))]
    return sorted(chosen)


def evaluate_generator(generator: nn.Module, pairs: PairSet, device: str = "cpu",
                       max_per_modality: int | None = None) -> dict[str, dict[str, float]]:
    indices = evaluation_indices(pairs, max_per_modality)
    return _scores(evaluate_pairs(lambda lr: predict_image(generator, lr, device), pairs, indices=indices))


def benchmark(models: Sequence[str], scales: Sequence[int], pairs_root: Path, models_root: Path,
              *, latency_side: int = 256, device: str = "cpu", max_per_modality: int | None = None) -> dict[str, Any]:
    """Score each trained model and bicubic on test (and val) ``standard`` pairs, per modality.

    ``max_per_modality`` limits each modality to that many evenly spaced images (smoke runs);
    the default, None, scores every image.
    """
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    for scale in scales:
        split_sets = {split: PairSet(pairs_root / split / f"x{scale}" / "standard") for split in ("test", "val")}
        baseline = build_generator("bicubic", scale)
        reference = {split: evaluate_generator(baseline, pairs, device, max_per_modality)
                     for split, pairs in split_sets.items()}
        for name in ("bicubic", *models):
            if name == "bicubic":
                generator, info = baseline, {}
            else:
                checkpoint = models_root / name / f"x{scale}" / "best.pt"
                generator, info = load_generator(checkpoint, device), checkpoint_info(checkpoint)
            scores = {split: (reference[split] if name == "bicubic"
                              else evaluate_generator(generator, pairs, device, max_per_modality))
                      for split, pairs in split_sets.items()}
            details.setdefault(name, {})[f"x{scale}"] = {
                "params": count_parameters(generator),
                "macs_per_output_mpixel": macs_per_output_megapixel(generator, scale) if name != "bicubic" else 0.0,
                "cpu_latency_ms_256": round(cpu_latency_ms(generator, latency_side), 2),
                "trained_steps": info.get("step"),
                "best_val_psnr": info.get("best_val_psnr"),
                "feature_loss": info.get("feature_loss"),
            }
            generator.to(device)
            for modality, test in scores["test"].items():
                val = scores["val"].get(modality, {})
                rows.append({
                    "model": name, "scale": scale, "modality": modality, "images": int(test["count"]),
                    "psnr": round(test["psnr"], 4), "ssim": round(test["ssim"], 4),
                    "bicubic_psnr": round(reference["test"][modality]["psnr"], 4),
                    "bicubic_ssim": round(reference["test"][modality]["ssim"], 4),
                    "gain_db": round(test["psnr"] - reference["test"][modality]["psnr"], 4),
                    "ssim_gain": round(test["ssim"] - reference["test"][modality]["ssim"], 4),
                    "val_psnr": round(val.get("psnr", float("nan")), 4),
                    "val_gain_db": round(val.get("psnr", float("nan")) - reference["val"].get(modality, {}).get("psnr", float("nan")), 4),
                })
    return {"definition": DEFINITION, "results": rows, "models": details}


DEFINITION = ("PSNR/SSIM on whole test images of the `standard` pairs, 1 channel, data range 1.0, border of `scale` "
              "pixels cropped, mean of per-image scores; SSIM: scikit-image, Gaussian window sigma 1.5 (11 taps), "
              "use_sample_covariance=False (Wang et al. 2004). gain_db = model PSNR - bicubic PSNR on the same images.")


def sample_crops(models: Sequence[str], scale: int, pairs_root: Path, models_root: Path, out: Path,
                 crop: int = 96, per_modality: int = 1) -> Path:
    """A grid of test crops: one row per modality, columns LR | bicubic | each model | HR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = PairSet(pairs_root / "test" / f"x{scale}" / "standard")
    picks: list[int] = []
    for modality in pairs.modalities():
        picks += [i for i, p in enumerate(pairs.pairs) if p["modality"] == modality][:per_modality]
    generators = {"bicubic": build_generator("bicubic", scale)}
    generators.update({name: load_generator(models_root / name / f"x{scale}" / "best.pt") for name in models})
    columns = ["LR", *generators, "HR"]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.9 * len(columns), 2.0 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        hr, lr = pairs.hr(i), pairs.lr(i)
        h, w = hr.shape[-2:]
        y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        y0, x0 = y0 - y0 % scale, x0 - x0 % scale
        window = (slice(y0, y0 + crop), slice(x0, x0 + crop))
        panels = {"LR": np.kron(lr[0], np.ones((scale, scale), np.float32))[window], "HR": hr[0][window]}
        for name, generator in generators.items():
            panels[name] = predict_image(generator, lr)[0][window]
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(panels[name], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(pairs.pairs[i]["modality"], fontsize=8)
    fig.suptitle(f"test crops, x{scale}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out


def benchmark_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Score every trained model and bicubic on the test split; write metrics and plots."""
    scales = [int(s) for s in section(params, "degrade.scales")]
    cfg = params.get("benchmark", {})
    models = [m for m in cfg.get("models", TRAINED_MODELS)]
    limit = cfg.get("max_images_per_modality")
    report = benchmark(models, scales, PAIRS_DIR, MODELS_DIR, latency_side=int(cfg.get("latency_side", 256)),
                       max_per_modality=None if limit is None else int(limit))
    write_json(METRICS_DIR / "benchmark.json", report)
    plots = Path("plots")
    with atomic_path(plots / "psnr.csv", suffix=".csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["series", "modality", "model", "scale", "psnr", "ssim", "gain_db"])
        writer.writeheader()
        for row in report["results"]:
            writer.writerow({"series": f"{row['model']} x{row['scale']}", "modality": row["modality"], "model": row["model"],
                             "scale": row["scale"], "psnr": row["psnr"], "ssim": row["ssim"], "gain_db": row["gain_db"]})
    for scale in scales:
        sample_crops(models, scale, PAIRS_DIR, MODELS_DIR, plots / f"crops_x{scale}.png")
    return report
