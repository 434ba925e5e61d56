"""Noisy-reference probe: how each trained model and consistency setting does on val images whose
HR reference carries its own (correlated) noise, on both tracks (:func:`medsr.evaluation.with_noisy_reference`).

Validation data only, never test: this is what chose ``params.yaml: consistency`` (threshold and
exponent). Each setting is scored against bicubic on the same images, per modality and track.
Usage: ``python benchmarks/probe_noisy_reference.py [--scale 2 4] [--models residual_cnn espcn]``;
needs the trained checkpoints (``make run``). Writes benchmarks/results/noisy_reference.json.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBES = ((0.0, 0.0), (0.003, 1.0), (0.006, 1.0), (0.006, 0.0))  # (HR noise sigma, correlation in HR px)
BEFORE = {"noise_threshold": 0.003, "noise_exponent": 4}  # the setting of session 4, for comparison


def main() -> None:
    import torch

    from medsr.atomic import write_json
    from medsr.benchmark import held_out_images
    from medsr.consistency import ConsistencySettings, refine
    from medsr.evaluation import evaluate_images, summarize, with_noisy_reference
    from medsr.models import build_generator
    from medsr.params import load_params
    from medsr.training.checkpoint import load_generator
    from medsr.inference import predict_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=None, help="default: every model in train.models")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "noisy_reference.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params(REPO / "params.yaml")
    chosen = ConsistencySettings.from_params(params["consistency"])
    settings = {"params": chosen, "before": replace(chosen, **BEFORE)}
    pairs_root = REPO / params["train"]["pairs_root"]
    rows = []
    for scale in args.scale:
        bicubic = build_generator("bicubic", scale)
        images = [im for track in ("clean", "realistic")
                  for im in held_out_images(pairs_root, "val", scale, track, {})]
        for name in args.models or list(params["train"]["models"]):
            checkpoint = REPO / params["train"]["out_root"] / name / f"x{scale}" / "best.pt"
            generator = load_generator(checkpoint)

            def outputs(lr, generator=generator, bicubic=bicubic, scale=scale):
                raw = predict_image(generator, lr)
                return {"bicubic": predict_image(bicubic, lr), "network alone": raw,
                        **{label: refine(raw, lr, scale, s) for label, s in settings.items()}}

            for sigma, correlation in PROBES:
                probed = images if sigma == 0 else with_noisy_reference(images, sigma, correlation, scale,
                                                                         params["degrade"])
                for row in summarize(evaluate_images(outputs, probed, scale)):
                    if row["model"] != "bicubic":
                        rows.append({"model": name, "scale": scale, "reference_noise": sigma,
                                     "correlation_px": correlation, "consistency": row["model"],
                                     **{k: row[k] for k in ("track", "modality", "images", "gain_db", "ssim_gain")}})
                print(f"x{scale} {name} reference noise {sigma} (correlation {correlation}): done", flush=True)
    write_json(args.out, {"split": "val", "settings": {k: s.as_dict() for k, s in settings.items()}, "rows": rows})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
