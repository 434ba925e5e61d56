"""GAN benchmark on this CPU: does the adversarial phase buy perceptual quality, and at what cost?

Each GAN is trained by the real trainer from scratch through the pixel warm-up the sample profile
gives it at x4 (the one ``make run`` trains, which beats bicubic) and then for a fixed adversarial
budget (:data:`ADVERSARIAL_STEPS`), with the sample profile's model settings. The
kept checkpoints (``warmup.pt``: best pixel-phase gain over bicubic; ``adversarial.pt``: lowest
MS-GMSD above the clean-track fidelity floor) and the raw weights at the last adversarial step
are scored on the whole *test* split, both evaluation tracks (clean, realistic): PSNR, SSIM and
MS-GMSD (lower is better, :mod:`medsr.perceptual`), with bicubic beside them and the seconds
each phase took. Writes ``benchmarks/results/gan.json`` and ``plots/gan_crops.png``
(LR | bicubic | warm-up | GAN | HR).

Data: ``data/pairs`` of this checkout when it has the evaluation tracks
(``data/pairs/test/x4/clean``); otherwise the data stages run in a temporary copy of the
repository (download of the embedded sample, validate, split, degrade: ~10 s). A degrade stage
from before the tracks existed leaves them out; they are then derived here (clean: antialiased
bicubic of HR; realistic: the standard pairs) and the JSON says so.

    .venv/bin/python benchmarks/bench_gan.py            # ~11 CPU-minutes (one thread)
    .venv/bin/python benchmarks/bench_gan.py --quick    # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SCALE = 4
# The GANs benchmarked, each through its sample-profile warm-up (``budgets``) and then ADVERSARIAL_STEPS
# steps, validated every VAL_EVERY steps in both phases (the adversarial checkpoint is picked among the
# adversarial phase's validations, the warm-up checkpoint among the warm-up's). BliMSR is
# left out: its sample warm-up does not beat bicubic (docs/history.md), so there is no warm-up to improve on.
GANS: tuple[str, ...] = ("srgan", "swift_srgan", "brainsr")
ADVERSARIAL_STEPS = 160
VAL_EVERY = 40
VAL_IMAGES = 6  # per track and validation: the selection's view of val (the test split is scored whole)
QUICK: dict[str, tuple[int, int, int]] = {model: (4, 4, 4) for model in GANS}


def budgets(params: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """model -> (pixel warm-up steps, adversarial steps, validate every): the warm-up the sample profile
    trains at x4, then :data:`ADVERSARIAL_STEPS`."""
    from medsr.training import TrainConfig

    return {model: (TrainConfig.from_params(params, model, SCALE, profile="sample").warmup_steps, ADVERSARIAL_STEPS,
                    VAL_EVERY) for model in GANS}


def _run_data_stages(repo_copy: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            if name and (REPO / name).is_file():
                (repo_copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, repo_copy / name)
    else:  # a working-tree copy without .git (e.g. on the GPU machine): everything but outputs
        skipped = {".git", ".venv", "data", "models", "mlartifacts", "mlflow.db", "__pycache__", ".dvc"}
        shutil.copytree(REPO, repo_copy, dirs_exist_ok=True,
                        ignore=lambda folder, names: {n for n in names if n in skipped})
    medsr = Path(sys.executable).with_name("medsr")
    for stage in ("download", "validate", "split", "degrade"):
        subprocess.run([str(medsr), stage], cwd=repo_copy, check=True, capture_output=True)


def _derive_tracks(pairs_root: Path) -> bool:
    """Add clean/realistic val+test tracks to a pair root written before they existed."""
    from medsr.data.pairs import PairItem, PairSet, write_pairs
    from medsr.degradations import degrade_bicubic

    derived = False
    for split in ("val", "test"):
        folder = pairs_root / split / f"x{SCALE}"
        if (folder / "clean" / "index.json").is_file() and (folder / "realistic" / "index.json").is_file():
            continue
        standard = PairSet(folder / "standard")
        items = []
        for i, pair in enumerate(standard.pairs):
            hr = np.array(standard.hr(i))
            items.append(PairItem(pair["id"], pair["modality"], hr, degrade_bicubic(hr, SCALE)))
        write_pairs(folder / "clean", items, scale=SCALE, attrs={"derived_by": "benchmarks/bench_gan.py"})
        shutil.copytree(folder / "standard", folder / "realistic", dirs_exist_ok=True)
        derived = True
    return derived


def pairs_root_for(scratch: Path) -> tuple[Path, str]:
    own = REPO / "data" / "pairs"
    if (own / "test" / f"x{SCALE}" / "clean" / "index.json").is_file():
        return own, "data/pairs of this checkout (degrade stage tracks)"
    copy = scratch / "repo"
    copy.mkdir()
    _run_data_stages(copy)
    root = copy / "data" / "pairs"
    if _derive_tracks(root):
        return root, ("sample data through the data stages in a temporary copy; clean/realistic tracks derived "
                      "by bench_gan (this degrade stage does not write them yet)")
    return root, "sample data through the data stages in a temporary copy (degrade stage tracks)"


def score(generator: torch.nn.Module, tracks: dict[str, Any], max_images: int | None = None) -> dict[str, Any]:
    """PSNR, SSIM, MS-GMSD per track (``max_images``: an evenly spaced subset per track)."""
    from medsr.inference import predict_image
    from medsr.training.trainer import score_track

    out = {}
    for track, pairs in tracks.items():
        indices = (None if max_images is None or max_images >= len(pairs)
                   else sorted({int(i) for i in np.linspace(0, len(pairs) - 1, max_images)}))
        scores = score_track(lambda lr: predict_image(generator, lr), pairs, indices)
        out[track] = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
        out[track]["per_modality"] = {m: {k: round(v, 4) for k, v in s.items() if isinstance(v, float)}
                                      for m, s in scores["per_modality"].items()}
    return out


def crop_figure(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["LR", "bicubic", "warm-up", "GAN", "HR"]
    fig, axes = plt.subplots(len(rows), 5, figsize=(12.5, 2.6 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per model: checks the script, no result")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gan.json")
    parser.add_argument("--figure", type=Path, default=REPO / "plots/gan_crops.png")
    parser.add_argument("--models", nargs="*", help="a subset of the benchmarked GANs")
    args = parser.parse_args()

    from medsr.atomic import write_json
    from medsr.data.pairs import PairSet
    from medsr.models import build_generator
    from medsr.params import load_params
    from medsr.perceptual import PERCEPTUAL_METRIC
    from medsr.training import TrainConfig, load_generator, train_generator
    from medsr.inference import predict_image

    # One intra-op thread: on a shared 2-core machine a second thread spin-waits more than it computes.
    torch.set_num_threads(1)
    params = load_params(REPO / "params.yaml")
    planned = QUICK if args.quick else budgets(params)
    if args.models:
        planned = {m: planned[m] for m in args.models}
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "setup": {"scale": SCALE, "split": "test", "tracks": ["clean", "realistic"],
                  "perceptual_metric": f"{PERCEPTUAL_METRIC} (lower is better)",
                  "model_settings": "params.yaml, sample profile (batch, patch, discriminator sizes)",
                  "budgets": {m: {"warmup_steps": w, "adversarial_steps": a, "val_every": v}
                              for m, (w, a, v) in planned.items()},
                  "selection": "warm-up: best mean val PSNR gain over bicubic; adversarial: lowest val MS-GMSD "
                               "among adversarial validations with clean val PSNR above bicubic's"},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        pairs_root, source = pairs_root_for(scratch)
        result["setup"]["data"] = source
        tracks = {t: PairSet(pairs_root / "test" / f"x{SCALE}" / t) for t in ("clean", "realistic")}
        result["bicubic"] = score(build_generator("bicubic", SCALE), tracks)
        crop_rows: list[tuple[str, list[np.ndarray]]] = []
        # The crop: the test image of the clean track with the most detail (largest HR gradient energy).
        clean = tracks["clean"]
        detail = [float(np.abs(np.diff(clean.hr(i), axis=-1)).mean()) for i in range(len(clean))]
        index = int(np.argmax(detail))
        for model, (warmup, adversarial, val_every) in planned.items():
            config = TrainConfig.from_params(
                params, model, SCALE, profile="sample", steps=warmup + adversarial, warmup_steps=warmup,
                val_every=val_every, val_max_images=VAL_IMAGES, checkpoint_every=warmup + adversarial,
                early_stopping_patience=None,
                num_workers=0, device="cpu", quiet=True, resume=False, pairs_root=str(pairs_root),
                out_dir=str(scratch / "models" / model))
            t0 = time.perf_counter()
            run = train_generator(config)
            seconds = time.perf_counter() - t0
            history = run.history
            warm_seconds = sum(h["seconds"] for h in history if h["phase"] == "warmup")
            adv_seconds = sum(h["seconds"] for h in history if h["phase"] == "adversarial")
            out_dir = Path(config.out_dir)
            entry: dict[str, Any] = {
                "seconds_total": round(seconds, 1),
                "seconds_warmup_training": round(warm_seconds, 1),
                "seconds_adversarial_training": round(adv_seconds, 1),
                "kept": {name: {k: record[k] for k in ("phase", "step", "val_psnr", "val_gain_db", PERCEPTUAL_METRIC,
                                                       "above_fidelity_floor")}
                         for name, record in run.checkpoints.items()},
                "validations": [{"step": h["step"], "phase": h["phase"], "val_psnr_clean": round(h["val"]["clean"]["psnr"], 3),
                                 "val_psnr_realistic": round(h["val"]["realistic"]["psnr"], 3),
                                 f"val_{PERCEPTUAL_METRIC}": round(h[PERCEPTUAL_METRIC], 4),
                                 "above_fidelity_floor": h["above_fidelity_floor"]} for h in history],
                "val_bicubic_psnr": {t: round(v["psnr"], 3) for t, v in run.bicubic_val.items()},
            }
            warm_generator = load_generator(out_dir / "warmup.pt")
            entry["test"] = {"warmup": score(warm_generator, tracks)}
            if (out_dir / "adversarial.pt").is_file():
                gan_generator = load_generator(out_dir / "adversarial.pt")
                entry["test"]["adversarial"] = score(gan_generator, tracks)
            else:  # nothing above the fidelity floor: report the last adversarial weights instead
                gan_generator = load_generator(out_dir / "last.pt")
                entry["test"]["adversarial_last_step"] = score(gan_generator, tracks)
            chosen = entry["test"].get("adversarial", entry["test"].get("adversarial_last_step"))
            warm = entry["test"]["warmup"]
            bic = result["bicubic"]
            entry["verdict"] = {
                "adversarial_checkpoint": "adversarial.pt" if "adversarial" in entry["test"] else
                                          "none above the fidelity floor (scores: last adversarial step)",
                "shipped_phase": run.best_phase,
                **{f"{PERCEPTUAL_METRIC}_improved_{t}": chosen[t][PERCEPTUAL_METRIC] < warm[t][PERCEPTUAL_METRIC]
                   for t in tracks},
                **{f"{PERCEPTUAL_METRIC}_change_{t}": round(chosen[t][PERCEPTUAL_METRIC] - warm[t][PERCEPTUAL_METRIC], 4)
                   for t in tracks},
                **{f"psnr_change_db_{t}": round(chosen[t]["psnr"] - warm[t]["psnr"], 3) for t in tracks},
                "clean_psnr_above_bicubic": chosen["clean"]["psnr"] > bic["clean"]["psnr"],
                # Where the adversarial phase started: the warm-up's own test gain over bicubic, per track.
                **{f"warmup_gain_db_{t}": round(warm[t]["psnr"] - bic[t]["psnr"], 3) for t in tracks},
            }
            result["models"][model] = entry
            print(model, entry["verdict"], f"{seconds:.0f} s", flush=True)

            lr, hr = clean.lr(index), clean.hr(index)
            size = min(96, hr.shape[-1], hr.shape[-2])
            y0, x0 = (hr.shape[-2] - size) // 2, (hr.shape[-1] - size) // 2
            bicubic_sr = predict_image(build_generator("bicubic", SCALE), lr)
            panels = [np.kron(lr[0], np.ones((SCALE, SCALE), np.float32)), bicubic_sr[0],
                      predict_image(warm_generator, lr)[0], predict_image(gan_generator, lr)[0], hr[0]]
            crop_rows.append((f"{model} ({clean.pairs[index]['modality']}, clean test)",
                              [p[y0:y0 + size, x0:x0 + size] for p in panels]))
        result["seconds"] = round(time.perf_counter() - started, 1)
        if not args.quick:
            crop_figure(crop_rows, args.figure)
            result["figure"] = str(args.figure.relative_to(REPO)) if args.figure.is_relative_to(REPO) else str(args.figure)
    write_json(args.out, result)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
