"""One-shot GPU benchmark: the `full` recipe of each GAN for a fixed number of minutes, CUDA + AMP.

GPU time is short and scarce, so this runs right the first time, in one call, inside a limit it
states before it starts: ``--minutes`` of training per model (half pixel warm-up, half
adversarial) plus calibration and scoring. Per model it records training steps/s of each phase,
peak GPU memory, and on the test split's evaluation tracks (clean, realistic) PSNR, SSIM and
MS-GMSD of bicubic, of the warm-up checkpoint and of the adversarial checkpoint, into
``benchmarks/results/gpu.json``. Everything of the `full` profile applies (model and
discriminator sizes, batch, patch, learning rates, step schedule, EMA) except the number of
steps, which the budget sets: ``steps = measured steps/s x minutes``.

    .venv/bin/python benchmarks/bench_gpu.py --minutes 1.5            # on the GPU machine: ~9 min
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --minutes 0.05 --models swift_srgan  # a CPU check

Data as ``bench_gan.py``: ``data/pairs`` when it has the evaluation tracks, else the data stages
in a temporary copy. A run that reaches its hard limit (1.5 x the training budget) stops
training, keeps what it validated and says ``"stopped_at_limit": true``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CALIBRATION_STEPS = 6  # timed steps per phase, after 2 untimed ones (CUDA kernels, cuDNN autotuning)
VALIDATIONS_PER_PHASE = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(config: Any, timed_steps: int = CALIBRATION_STEPS) -> dict[str, float]:
    """Steps/s of the warm-up and the adversarial step of ``config`` (not a training run)."""
    from medsr.training import PatchBatches
    from medsr.training.trainer import _Run

    run = _Run(config)
    batches = PatchBatches(config.pairs_root, kind=run.spec.training_pairs, target_scale=config.scale,
                           batch_size=config.batch_size, lr_patch=config.lr_patch, seed=config.seed, first_step=1,
                           last_step=config.steps, total_steps=config.steps, curriculum=run.curriculum,
                           blind_fraction=config.blind_fraction)
    rates = {}
    for phase, first in (("warmup", 1), ("adversarial", config.warmup_steps + 1)):
        times = []
        for k in range(2 + timed_steps):
            run.step = first + k
            batch = batches.batch(run.step)
            _sync(run.device)
            t0 = time.perf_counter()
            run.train_step(batch)
            _sync(run.device)
            if k >= 2:
                times.append(time.perf_counter() - t0)
        rates[phase] = len(times) / sum(times)
    del run
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.5, help="training minutes per model (both phases)")
    parser.add_argument("--models", nargs="*", help="default: every adversarial model in the registry")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--pairs-root", type=Path, help="default: data/pairs, or the data stages in a temp copy")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu.json")
    parser.add_argument("--val-max-images", type=int, default=8, help="per track, for checkpoint selection")
    parser.add_argument("--test-max-images", type=int, default=None, help="per track; default: the whole test split")
    parser.add_argument("--calibration-steps", type=int, default=CALIBRATION_STEPS, help="timed steps per phase")
    args = parser.parse_args(argv)

    from bench_gan import pairs_root_for, score  # the same data and scoring as the CPU GAN benchmark

    from medsr.atomic import write_json
    from medsr.data.pairs import PairSet
    from medsr.models import build_generator, model_names, model_spec
    from medsr.params import load_params
    from medsr.perceptual import PERCEPTUAL_METRIC
    from medsr.inference import pick_device
    from medsr.training import TrainConfig, load_generator, train_generator

    if args.models is None:
        args.models = [name for name in model_names(trained=True) if model_spec(name).adversarial]
    device = pick_device(args.device)
    budget_s = 60.0 * args.minutes
    hard_limit_s = 1.5 * budget_s
    # Stated up front: training budget + calibration + scoring, so a caller can size its timeout.
    print(f"bench_gpu: {len(args.models)} model(s) x {args.minutes:.2f} min training on {device} "
          f"(hard limit {hard_limit_s / 60:.2f} min each); expect about "
          f"{len(args.models) * (args.minutes + 0.5):.1f} min in all", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    params = load_params(REPO / "params.yaml")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "setup": {"profile": "full", "amp": device.type == "cuda", "minutes_per_model": args.minutes,
                  "scale": args.scale, "perceptual_metric": f"{PERCEPTUAL_METRIC} (lower is better)",
                  "steps": "measured steps/s x minutes/2 per phase"},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.pairs_root is not None:
            pairs_root, source = args.pairs_root, str(args.pairs_root)
        else:
            pairs_root, source = pairs_root_for(scratch)
        result["setup"]["data"] = source
        tracks = {t: PairSet(pairs_root / "test" / f"x{args.scale}" / t) for t in ("clean", "realistic")}
        result["bicubic"] = score(build_generator("bicubic", args.scale), tracks, args.test_max_images)
        for model in args.models:
            common = dict(profile="full", device=str(device), amp=True, num_workers=min(4, os.cpu_count() or 1),
                          quiet=True, resume=False, pairs_root=str(pairs_root), early_stopping_patience=None,
                          val_max_images=args.val_max_images, out_dir=str(scratch / model))
            probe = TrainConfig.from_params(params, model, args.scale, steps=100, warmup_steps=50, **common)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rates = calibrate(probe, args.calibration_steps)
            warmup = max(2, int(rates["warmup"] * budget_s / 2))
            adversarial = max(2, int(rates["adversarial"] * budget_s / 2))
            val_every = max(1, min(warmup, adversarial) // VALIDATIONS_PER_PHASE)
            config = TrainConfig.from_params(params, model, args.scale, steps=warmup + adversarial,
                                             warmup_steps=warmup, val_every=val_every,
                                             checkpoint_every=warmup + adversarial, **common)
            t0 = time.perf_counter()
            run = train_generator(config, max_steps_this_run=val_every)
            while not run.finished and time.perf_counter() - t0 < hard_limit_s:
                run = train_generator(config, max_steps_this_run=val_every)  # resumes; chunks let the limit act
            seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "calibrated_steps_per_s": {k: round(v, 2) for k, v in rates.items()},
                "warmup_steps": warmup, "adversarial_steps": adversarial, "steps_done": run.steps_done,
                "stopped_at_limit": not run.finished, "seconds": round(seconds, 1),
                "steps_per_s": {phase: round(_phase_rate(run.history, phase), 2) for phase in ("warmup", "adversarial")},
                "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                    if device.type == "cuda" else None),
                "kept": {name: {k: record[k] for k in ("phase", "step", "val_psnr", PERCEPTUAL_METRIC,
                                                       "above_fidelity_floor")}
                         for name, record in run.checkpoints.items()},
                "test": {},
            }
            for name in ("warmup", "adversarial"):
                path = Path(config.out_dir) / f"{name}.pt"
                if path.is_file():
                    entry["test"][name] = score(load_generator(path, device), tracks, args.test_max_images)
            result["models"][model] = entry
            print(model, {k: entry[k] for k in ("steps_done", "steps_per_s", "peak_memory_gib", "seconds")},
                  flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return result


def _phase_rate(history: list[dict[str, Any]], phase: str) -> float:
    """Training steps/s of one phase from the trainer's history (validation time excluded)."""
    steps, seconds, previous = 0, 0.0, 0
    for entry in history:
        if entry["phase"] == phase:
            steps += entry["step"] - previous
            seconds += entry["seconds"]
        previous = entry["step"]
    return steps / seconds if seconds > 0 else 0.0


if __name__ == "__main__":
    main()
