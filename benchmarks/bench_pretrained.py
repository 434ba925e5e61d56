"""Published weights on MedSR's held-out images: as published, fine-tuned, shipped, beside the scratch champion.

    python benchmarks/bench_pretrained.py [--weights DIR] [--scales 2 4] [--phase verify|experiments|report|all]

Reads the published checkpoints from ``pretrained/`` (or ``--weights DIR``), checks each against
its sha256 (``medsr.pretrained.KNOWN_CHECKPOINTS``) and loads it strictly. ``experiments`` fine-tunes
RLFN on the ``standard`` training pairs with each recipe of ``RECIPES`` and scores every snapshot on
validation (cached under ``tmp/pretrained-bench``, minutes per recipe). ``report`` picks the
fine-tuned network and the shipped variant on validation alone, then writes
``benchmarks/results/pretrained.json``: ``rows`` with split (val, test), scale, track, modality
(and ``all``), architecture, variant (published, fine_tuned, shipped, scratch_champion), gain_db
over bicubic and images; plus ``experiments`` (every recipe's val ``all`` gains) and ``choices``.
The scratch champion (ESPCN x4, residual CNN x2, with the consistency step, as served) is read
from the pipeline's own benchmark, ``metrics/benchmark.json``: the same pairs and the same scoring.

Needs the pair sets (`dvc repro degrade`). Run with ``nice``: it trains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "pretrained.json"
CACHE = REPO / "tmp" / "pretrained-bench"
TRACKS = ("clean", "realistic")
SPLITS = ("val", "test")
CHAMPIONS = {2: "residual_cnn", 4: "espcn"}  # params' registry champions (metrics/register.json)


def recipes():
    """The fine-tuning recipes measured, by name: learning rate (5e-5, 1e-4) and steps (snapshots at 200
    and 400), a clean-heavier mix, L2-SP, EMA (measured inside the 1e-4 run), freezing the first blocks.
    Each costs ~10 minutes of a shared 2-core CPU at 400 steps, which is what bounds the list."""
    from medsr.finetune import FineTuneSettings

    base = {"steps": 400, "learning_rate": 1e-4}
    return {
        "lr5e-5": (FineTuneSettings(**{**base, "learning_rate": 5e-5}), (200,)),
        "lr1e-4": (FineTuneSettings(**base, ema_decay=0.99), (200,)),
        "clean0.5": (FineTuneSettings(**base, clean_fraction=0.5), ()),
        "l2sp0.1": (FineTuneSettings(**base, l2sp_weight=0.1), ()),
        "freeze3": (FineTuneSettings(**base, freeze=("conv_1", "block_1", "block_2")), ()),
    }


def verify(weights: Path) -> list[dict]:
    """Each shared checkpoint: sha256, strict load, grey == RGB on a real image, flat in -> flat out."""
    from medsr.models.published import rgb_reference_output
    from medsr.pretrained import KNOWN_CHECKPOINTS, find_checkpoint, load_published

    checks = []
    for (name, scale), init in KNOWN_CHECKPOINTS.items():
        path = find_checkpoint(init, weights)  # found and checked, or one line saying what to put where
        generator = load_published(name, scale, path).eval()
        trunk = generator.trunk_class(scale, colours=3)
        trunk.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        x = torch.linspace(0, 1, 48 * 40).reshape(1, 1, 48, 40) ** 2
        flat = torch.full((1, 1, 48, 48), 0.6)
        with torch.no_grad():
            diff = float((generator.train()(x) - rgb_reference_output(trunk.eval(), x, generator.layout)).abs().max())
            flat_out = generator.eval()(flat)[..., 80:-80, 80:-80] if scale == 4 else generator.eval()(flat)[..., 40:-40, 40:-40]
        checks.append({"architecture": name, "scale": scale, "file": init.file, "sha256": init.sha256,
                       "licence": init.licence, "source": init.source, "loads_strictly": True,
                       "grey_vs_rgb_max_abs_diff_float32": diff,
                       "flat_0.6_output_max_abs_error": float((flat_out - 0.6).abs().max())})
        print(f"{name} x{scale}: {init.file} sha256 ok, strict load ok, grey vs RGB {diff:.1e}, "
              f"flat 0.6 -> max error {checks[-1]['flat_0.6_output_max_abs_error']:.1e}", flush=True)
    return checks


def published(name: str, scale: int, weights: Path):
    from medsr.pretrained import KNOWN_CHECKPOINTS, load_published

    return load_published(name, scale, weights / KNOWN_CHECKPOINTS[(name, scale)].file).eval()


def experiments(scale: int, weights: Path) -> list[dict]:
    from medsr.finetune import all_row_gains, fine_tune_cached, score_predictors, with_weights
    from medsr.inference import predict_image

    start = published("rlfn", scale, weights)
    results_path = CACHE / f"x{scale}" / "experiments.json"
    done = {r["candidate"]: r for r in json.loads(results_path.read_text())} if results_path.is_file() else {}
    for recipe, (settings, snapshots) in recipes().items():
        began = time.perf_counter()
        paths = fine_tune_cached(start, REPO / "data/pairs", scale, settings, snapshots, CACHE / f"x{scale}" / recipe,
                                 log=lambda line, r=recipe: print(f"x{scale} {r}: {line}", flush=True))
        seconds = time.perf_counter() - began
        for snapshot, path in paths.items():
            candidate = f"{recipe}@{snapshot}"
            if candidate in done and done[candidate]["settings"] == settings.as_dict():
                continue
            model = with_weights(start, path)
            rows = score_predictors({candidate: lambda lr, m=model: predict_image(m, lr)}, REPO / "data/pairs",
                                    scale, "val", TRACKS)
            done[candidate] = {"candidate": candidate, "recipe": recipe, "snapshot": snapshot, "scale": scale,
                               "settings": settings.as_dict(), "val": all_row_gains(rows, candidate),
                               "train_seconds": round(seconds, 1)}
            print(f"x{scale} {candidate}: val {done[candidate]['val']}", flush=True)
            results_path.write_text(json.dumps(list(done.values()), indent=1))
    return list(done.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO / "pretrained")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--phase", choices=["verify", "experiments", "report", "all"], default="all",
                        help="verify always runs first (sha256, strict load); experiments are cached in tmp/")
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(1)  # the machine's cores are shared: one thread each is the fastest per core
    from medsr.data.sources.errors import SourceError

    try:
        checks = verify(args.weights)
    except SourceError as err:  # a checkpoint missing or altered: the one line that says what to put where
        raise SystemExit(f"bench_pretrained: {err}") from None
    if args.phase in ("experiments", "all"):
        for scale in args.scales:
            experiments(scale, args.weights)
    if args.phase in ("report", "all"):
        from medsr.finetune import pretrained_report

        report = pretrained_report(args.scales, args.weights, checks, CACHE, REPO / "data/pairs",
                                   REPO / "metrics/benchmark.json", champions=CHAMPIONS)
        report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
        from medsr.atomic import write_json

        write_json(OUT, report)
        print(f"wrote {OUT.relative_to(REPO)}: {len(report['rows'])} rows")
        from medsr.finetune import markdown_tables

        print(markdown_tables(report))


if __name__ == "__main__":
    main()
