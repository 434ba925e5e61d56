"""Benchmark: every trained model against bicubic on the test split's whole images.

One definition of the scores (docs/metrics-and-consistency.md): 1-channel, data range 1.0, a border of
``scale`` pixels cropped, the mean of per-image scores; SSIM with an 11-tap Gaussian window,
sigma 1.5 (scikit-image, as Wang et al.). Besides quality it reports parameters,
multiply-accumulates per output megapixel and CPU latency for a 256x256 input.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medsr.atomic import atomic_path, write_json
from medsr.consistency import ConsistencySettings
from medsr.data.pairing import EVAL_SPLITS
from medsr.data.pairs import PairSet
from medsr.data.split import file_label
from medsr.degradations import TRACKS
from medsr.evaluation import HeldOutImage, evaluate_images, summarize
from medsr.inference import Upscaler, available_cores
from medsr.models import build_generator, count_parameters
from medsr.params import section
from medsr.pipeline import METRICS_DIR, PAIRS_DIR, SPLIT_DIR
from medsr.pretrained import PRETRAINED_ROOT, checkpoint_inits, load_published
from medsr.stage_entry import MODELS_DIR
from medsr.training.checkpoint import checkpoint_info, load_generator
from medsr.training.trainer import TRAINING_MEMORY_FORMAT

# Networks are scored in the layout the trainer validated them in: the same convolutions, so a val cell
# here is the trainer's to float rounding, and a fixed layout (serving measures and picks its own,
# medsr.inference.choose_memory_format) so no score depends on a timing. On this CPU it runs the SRResNet
# family 2-4x faster than contiguous weights (SRGAN x4, a 128-px input: 186 ms against 679 ms).
SCORING_MEMORY_FORMAT = TRAINING_MEMORY_FORMAT

RAW_SUFFIX = ":raw"  # the network's output before the consistency step, in the ablation rows
# The zero-parameter baseline a user gets for free: bicubic, then the same consistency step the models get.
# A model is worth shipping only where it beats this, not just plain bicubic.
CONSISTENCY_BASELINE = "bicubic+consistency"
BASELINES = ("bicubic", CONSISTENCY_BASELINE)
PUBLISHED_SUFFIX = "@published"  # a published checkpoint scored as it is (a reference, never a registry candidate)

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


def cpu_latency_ms(model: nn.Module, side: int = 256, repeats: int = 3, budget_s: float = 1.0) -> float:
    """Median wall time of one forward pass on a ``side`` x ``side`` LR input, on the CPU: of
    ``repeats`` timed passes after a warm-up, fewer once the timed ones add up to ``budget_s``
    (at least one; like timeit's autorange, a second-long pass needs no three repeats to be read),
    in :data:`SCORING_MEMORY_FORMAT`."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    model = model.to("cpu", memory_format=SCORING_MEMORY_FORMAT).eval()
    x = torch.rand(1, 1, side, side)
    with torch.inference_mode():
        model(x)  # warm-up: first call allocates and picks kernels
        times: list[float] = []
        while len(times) < repeats and sum(times) < budget_s * 1000:
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def evaluation_indices(pairs: PairSet, max_per_modality: int | None) -> list[int]:
    """Every pair, or at most ``max_per_modality`` evenly spaced pairs of each modality (quick runs)."""
    if max_per_modality is None:
        return list(range(len(pairs)))
    chosen: list[int] = []
    for modality in pairs.modalities():
        members = [i for i, p in enumerate(pairs.pairs) if p["modality"] == modality]
        picks = np.linspace(0, len(members) - 1, min(max_per_modality, len(members))).round().astype(int)
        chosen += [members[i] for i in sorted(set(picks.tolist()))]
    return sorted(chosen)


def held_out_images(pairs_root: Path, split: str, scale: int, track: str, sources: Mapping[str, str],
                    max_per_modality: int | None = None) -> list[HeldOutImage]:
    """The images of ``<split>/x<scale>/<track>``; ``sources`` maps image id to its file label."""
    pairs = PairSet(pairs_root / split / f"x{scale}" / track)
    return [HeldOutImage(key=pairs.pairs[i]["id"], modality=pairs.pairs[i]["modality"],
                         source=sources.get(pairs.pairs[i]["id"], pairs.pairs[i]["id"]), track=track,
                         hr=pairs.hr(i), lr=pairs.lr(i))
            for i in evaluation_indices(pairs, max_per_modality)]


def model_outputs(generator: nn.Module, name: str, scale: int, consistency: ConsistencySettings,
                  device: str = "cpu") -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """LR -> {name: the served output, name + RAW_SUFFIX: the network alone} (one forward for both).

    The :class:`medsr.inference.Upscaler` the service builds, on whole images, in :data:`SCORING_MEMORY_FORMAT`."""
    upscaler = Upscaler(generator.to(memory_format=SCORING_MEMORY_FORMAT), scale, consistency=consistency, device=device)

    def outputs(lr: np.ndarray) -> dict[str, np.ndarray]:
        upscaled = upscaler(lr, score=False)
        if not consistency.enabled:
            return {name: upscaled.output}
        return {name: upscaled.output, name + RAW_SUFFIX: upscaled.raw}

    return outputs


def baseline_outputs(scale: int, consistency: ConsistencySettings,
                     device: str = "cpu") -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """LR -> {bicubic, bicubic+consistency}: the two baselines (one bicubic upsampling for both)."""
    upscaler = Upscaler(build_generator("bicubic", scale), scale, consistency=consistency, device=device)

    def outputs(lr: np.ndarray) -> dict[str, np.ndarray]:
        upscaled = upscaler(lr, score=False)
        return {"bicubic": upscaled.raw, CONSISTENCY_BASELINE: upscaled.output}

    return outputs


def network_only(row: Mapping[str, Any], consistency: ConsistencySettings) -> bool:
    """Whether a benchmark row scores a network without the consistency step (an ``ablation`` row)."""
    return consistency.enabled and not row["consistency"] and row["model"] not in BASELINES


def with_network_gains(rows: Sequence[dict[str, Any]], consistency: ConsistencySettings) -> list[dict[str, Any]]:
    """The served rows (one per model and cell), each with the network's own gain and the baseline's beside it.

    ``network_gain_db`` / ``network_ssim_gain``: the network alone, no consistency step (for the
    baselines: bicubic's, 0). ``baseline_gain_db`` / ``baseline_ssim_gain``: what
    ``bicubic+consistency`` gains on the same cell, so ``gain_db - baseline_gain_db`` is what the
    model adds beyond the free step.
    """
    def cell(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["split"], r["scale"], r["track"], r["modality"])

    raw = {(r["model"], *cell(r)): r for r in rows if network_only(r, consistency)}
    baseline = {cell(r): r for r in rows if r["model"] == CONSISTENCY_BASELINE}
    served = []
    for r in rows:
        if network_only(r, consistency):
            continue
        # Consistency off: the served output is the network's own. The baselines' network is bicubic.
        alone = {"gain_db": 0.0, "ssim_gain": 0.0} if r["model"] in BASELINES else raw.get((r["model"], *cell(r)), r)
        base = baseline.get(cell(r), {})
        served.append({**r, "network_gain_db": alone["gain_db"], "network_ssim_gain": alone["ssim_gain"],
                       "baseline_gain_db": base.get("gain_db"), "baseline_ssim_gain": base.get("ssim_gain")})
    return served


def image_sources(split_table: Path) -> dict[str, str]:
    """Image id -> file label (:func:`medsr.data.split.file_label`) from the split table, when present."""
    if not split_table.is_file():
        return {}
    table = pd.read_parquet(split_table, columns=["id", "path", "source"])
    return {i: file_label(str(p), str(s)) for i, p, s in zip(table["id"], table["path"], table["source"], strict=True)}


def references_at(references: Mapping[str, Mapping[int, nn.Module]], scale: int) -> dict[str, nn.Module]:
    """The reference networks (published weights) that exist at ``scale``, by name."""
    return {name: networks[scale] for name, networks in references.items() if scale in networks}


def _score_scale(scale: int, *, models: Sequence[str], pairs_root: Path, models_root: Path, tracks: Sequence[str],
                 consistency: ConsistencySettings, sources: Mapping[str, str], device: str,
                 max_per_modality: int | None, references: Mapping[str, Mapping[int, nn.Module]]) -> dict[str, Any]:
    """One scale of :func:`benchmark`, latency aside: its rows, image keys and per-model details."""
    extra = references_at(references, scale)
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    keys: dict[str, Any] = {}
    sets = {(split, track): held_out_images(pairs_root, split, scale, track, sources, max_per_modality)
            for split in EVAL_SPLITS for track in tracks}
    for (split, track), images in sets.items():
        per_track = keys.setdefault(split, {}).setdefault(track, {})
        for image in images:
            per_track.setdefault(image.modality, []).append(image.key)
    baseline = build_generator("bicubic", scale)
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in EVAL_SPLITS}
    for (split, _track), images in sets.items():
        records[split] += evaluate_images(baseline_outputs(scale, consistency, device), images, scale)
    for name in (*BASELINES, *models, *extra):
        if name in BASELINES:
            generator, info = baseline, {}
        else:
            if name in extra:
                generator, info = extra[name].to(device).eval(), {"phase": "published"}
            else:
                checkpoint = models_root / name / f"x{scale}" / "best.pt"
                generator, info = load_generator(checkpoint, device), checkpoint_info(checkpoint)
            outputs = model_outputs(generator, name, scale, consistency, device)
            for (split, _track), images in sets.items():
                records[split] += evaluate_images(outputs, images, scale)
        details[name] = {
            "params": count_parameters(generator),
            "macs_per_output_mpixel": macs_per_output_megapixel(generator, scale) if name not in BASELINES else 0.0,
            "trained_steps": info.get("step"),
            "phase": info.get("phase", "pixel" if name not in BASELINES else None),
            "best_val_psnr": info.get("best_val_psnr"),
            "feature_loss": info.get("feature_loss"),
            "model_options": info.get("model_options"),  # the size trained (a profile may train a smaller member)
        }
    for split in EVAL_SPLITS:
        for row in summarize(records[split]):
            raw = row["model"].endswith(RAW_SUFFIX)
            model = row["model"].removesuffix(RAW_SUFFIX)
            rows.append({**row, "model": model, "scale": scale, "split": split,
                         "consistency": bool(consistency.enabled and not raw and model != "bicubic"),
                         "network": "bicubic" if model in BASELINES else model,
                         "phase": details.get(model, {}).get("phase")})
    return {"rows": rows, "images": keys, "details": details}


def _one_torch_thread() -> None:
    torch.set_num_threads(1)  # the processes share the cores


def map_scales(func: Callable[[int], Any], scales: Sequence[int], workers: int) -> list[Any]:
    """``[func(scale) for scale in scales]``, on ``workers`` spawned processes of one torch thread
    each when ``workers`` > 1 (``func`` must pickle: a module-level function or a partial of one).

    Scores computed there are those of one torch thread, whichever process finishes first (1 and 2
    threads may round float sums differently). The scoring's NumPy and SciPy parts run on one core, so
    on 2 cores two scales side by side finish sooner than one process on 2 threads.
    """
    if workers <= 1 or len(scales) < 2:
        return [func(scale) for scale in scales]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter (a fork would copy a host process's threads and locks, e.g. a Prefect worker's)
    with ProcessPoolExecutor(max_workers=min(workers, len(scales)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_torch_thread) as pool:
        return list(pool.map(func, scales))


def benchmark(models: Sequence[str], scales: Sequence[int], pairs_root: Path, models_root: Path,
              *, tracks: Sequence[str] = TRACKS, consistency: ConsistencySettings = ConsistencySettings(),
              sources: Mapping[str, str] | None = None, latency_side: int = 256, device: str = "cpu",
              max_per_modality: int | None = None,
              references: Mapping[str, Mapping[int, nn.Module]] | None = None, workers: int = 1) -> dict[str, Any]:
    """Score each trained model and both baselines on the test and val tracks, per modality.

    ``references``: networks scored beside them without a checkpoint of their own, by name and
    scale: a published network as a user gets it (``rlfn@published``, :mod:`medsr.pretrained`).
    ``workers`` > 1 scores the scales in that many processes (:func:`map_scales`); the CPU latency
    is timed here afterwards, one network at a time (timed beside other work it would be wrong).

    ``results``: test rows per model (and ``bicubic``, ``bicubic+consistency``), scale, track and
    modality (and ``all``), each with ``images``, ``files``, PSNR/SSIM, bicubic's, ``gain_db`` and
    ``ssim_gain`` (the system: network + consistency step), ``network_gain_db`` and
    ``network_ssim_gain`` (the network alone), ``baseline_gain_db`` (bicubic+consistency's gain on
    the cell), foreground scores for CT/MRI, and the same cell's validation numbers (``val_*``).
    ``validation``: the val rows (what the registry selects on). ``ablation``: each model without
    the consistency step. ``images``: the image keys behind every cell. ``max_per_modality``
    limits each set to evenly spaced images (smoke runs).
    """
    from functools import partial

    references = dict(references or {})
    score = partial(_score_scale, models=list(models), pairs_root=Path(pairs_root), models_root=Path(models_root),
                    tracks=list(tracks), consistency=consistency, sources=dict(sources or {}), device=device,
                    max_per_modality=max_per_modality, references=references)
    rows: list[dict[str, Any]] = []
    image_keys: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for scale, part in zip(scales, map_scales(score, scales, workers), strict=True):
        rows += part["rows"]
        image_keys[f"x{scale}"] = part["images"]
        extra = references_at(references, scale)
        for name, detail in part["details"].items():
            if name in BASELINES:
                generator = build_generator("bicubic", scale)
            else:
                generator = extra[name] if name in extra else load_generator(
                    Path(models_root) / name / f"x{scale}" / "best.pt", device)
            latency = round(cpu_latency_ms(generator, latency_side), 2)
            generator.to(device)
            details.setdefault(name, {})[f"x{scale}"] = {
                "params": detail.pop("params"), "macs_per_output_mpixel": detail.pop("macs_per_output_mpixel"),
                "cpu_latency_ms_256": latency, **detail}

    def cell(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["model"], r["scale"], r["track"], r["modality"])

    served = with_network_gains(rows, consistency)
    val = {cell(r): r for r in served if r["split"] == "val"}
    results = []
    for r in served:
        if r["split"] != "test":
            continue
        v = val.get(cell(r), {})
        results.append({**r, **{f"val_{k}": v.get(k) for k in VAL_FIELDS}, "val_images": v.get("images", 0)})
    ablation = [r for r in rows if network_only(r, consistency)]
    return {"definition": DEFINITION, "tracks": list(tracks), "consistency": consistency.as_dict(),
            "results": results, "validation": [r for r in served if r["split"] == "val"],
            "ablation": ablation, "images": image_keys, "models": details}


VAL_FIELDS = ("gain_db", "ssim_gain", "network_gain_db", "network_ssim_gain", "baseline_gain_db", "baseline_ssim_gain")

DEFINITION = ("Held-out images (test and val hold whole files, or regions of a one-file modality separated by a gap), "
              "two tracks: clean = antialiased bicubic down only; realistic = Gaussian blur degrade.blur_sigma, "
              "antialiased bicubic down, the modality's noise. PSNR/SSIM 1 channel, data range 1.0, border of `scale` "
              "pixels cropped, mean of per-image scores; SSIM: scikit-image, Gaussian window sigma 1.5 (11 taps), "
              "use_sample_covariance=False (Wang et al. 2004). gain_db = model PSNR - bicubic PSNR on the same images; "
              "*_fg: inside an Otsu body/brain mask of the HR image (CT, MRI). images/files: how many images and "
              "source files are behind each number. Models are scored with the consistency step of params "
              "`consistency` (rows `consistency: true`): gain_db is the system's gain (network + step), "
              "network_gain_db the network's alone (the `ablation` rows). The baseline `bicubic+consistency` is "
              "bicubic followed by the same step, which any image gets for free; baseline_gain_db is its gain on "
              "the same cell, and a model adds only gain_db - baseline_gain_db.")


def sample_crops(models: Sequence[str], scale: int, pairs_root: Path, models_root: Path, out: Path, *,
                 tracks: Sequence[str] = TRACKS, consistency: ConsistencySettings = ConsistencySettings(),
                 crop: int = 96, per_modality: int = 1) -> Path:
    """A grid of test crops: one row per track and modality, columns LR | bicubic | each model | HR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generators = {"bicubic": build_generator("bicubic", scale)}
    generators.update({name: load_generator(models_root / name / f"x{scale}" / "best.pt") for name in models})
    picks: list[tuple[str, PairSet, int]] = []
    for track in tracks:
        pairs = PairSet(pairs_root / "test" / f"x{scale}" / track)
        for modality in pairs.modalities():
            picks += [(track, pairs, i) for i, p in enumerate(pairs.pairs) if p["modality"] == modality][:per_modality]
    columns = ["LR", *generators, "HR"]
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.9 * len(columns), 2.0 * len(picks)), squeeze=False)
    for row, (track, pairs, i) in enumerate(picks):
        hr, lr = pairs.hr(i), pairs.lr(i)
        h, w = hr.shape[-2:]
        y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
        y0, x0 = y0 - y0 % scale, x0 - x0 % scale
        window = (slice(y0, y0 + crop), slice(x0, x0 + crop))
        panels = {"LR": np.kron(lr[0], np.ones((scale, scale), np.float32))[window], "HR": hr[0][window]}
        for name, generator in generators.items():
            upscaler = Upscaler(generator, scale, consistency=consistency if name != "bicubic" else ConsistencySettings())
            panels[name] = upscaler(lr, score=False).output[0][window]
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(panels[name], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{pairs.pairs[i]['modality']}\n{track}", fontsize=8)
    fig.suptitle(f"test crops, x{scale} (models with the consistency step)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out


def benchmark_stage(params: dict[str, Any]) -> dict[str, Any]:
    """Score every trained model and bicubic on the test and val tracks; write metrics and plots."""
    scales = [int(s) for s in section(params, "degrade.scales")]
    tracks = list(section(params, "degrade.tracks"))
    cfg = params.get("benchmark", {})
    consistency = ConsistencySettings.from_params(params.get("consistency"))
    models = [str(m) for m in section(params, "train.models")]  # the keys DVC's train foreach iterates over
    limit = cfg.get("max_images_per_modality")
    references: dict[str, dict[int, nn.Module]] = {}
    for model, scale, init in checkpoint_inits(params):  # each imported checkpoint as published, beside its fine-tune
        references.setdefault(f"{model}{PUBLISHED_SUFFIX}", {})[scale] = load_published(
            model, scale, PRETRAINED_ROOT / init.file)
    report = benchmark(models, scales, PAIRS_DIR, MODELS_DIR, tracks=tracks, consistency=consistency,
                       sources=image_sources(SPLIT_DIR / "images.parquet"),
                       latency_side=int(cfg.get("latency_side", 256)),
                       max_per_modality=None if limit is None else int(limit), references=references,
                       workers=min(len(scales), available_cores()))
    write_json(METRICS_DIR / "benchmark.json", report)
    plots = Path("plots")
    fields = ["series", "modality", "model", "scale", "track", "psnr", "ssim", "gain_db", "ssim_gain", "images"]
    with atomic_path(plots / "psnr.csv", suffix=".csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in report["results"]:
            writer.writerow({"series": f"{row['model']} x{row['scale']} {row['track']}",
                             **{k: row[k] for k in fields if k != "series"}})
    for scale in scales:
        sample_crops(models, scale, PAIRS_DIR, MODELS_DIR, plots / f"crops_x{scale}.png", tracks=tracks,
                     consistency=consistency)
    return report


def score_generator(generator: nn.Module, scale: int, pairs_root: Path, *, split: str = "test",
                    tracks: Sequence[str] = TRACKS, consistency: ConsistencySettings = ConsistencySettings(),
                    device: str = "cpu") -> list[dict[str, Any]]:
    """One generator's rows (as in ``results``, bicubic's numbers beside) on ``split``: the registry's re-evaluation."""
    baseline = Upscaler(build_generator("bicubic", scale), scale, device=device)
    outputs = model_outputs(generator, "candidate", scale, consistency, device)
    records: list[dict[str, Any]] = []
    for track in tracks:
        images = held_out_images(pairs_root, split, scale, track, {})
        records += evaluate_images(lambda lr: {"bicubic": baseline.network(lr),
                                               **{k: v for k, v in outputs(lr).items() if k == "candidate"}},
                                   images, scale)
    return [row for row in summarize(records) if row["model"] == "candidate"]
