"""Model benchmark on this CPU: training patches/s (real trainer, real pairs) and inference
megapixels/s per model and scale. Writes benchmarks/results/models.json.

Needs the pair sets: runs `dvc repro degrade` first when data/pairs is missing. With CUDA
present (the `device` tool's GPU machine) it also records the same figures on the GPU.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH, LR_PATCH, STEPS = 16, 24, 20


def training_patches_per_s(params: dict, model: str, scale: int, device: str, out: Path) -> float:
    from medsr.training import TrainConfig, train_generator

    config = TrainConfig.from_params(params, model, scale, steps=STEPS, warmup_steps=0, batch_size=BATCH,
                                     lr_patch=LR_PATCH, val_every=STEPS, checkpoint_every=STEPS, val_max_images=1,
                                     early_stopping_patience=None, num_workers=0, device=device, quiet=True,
                                     out_dir=str(out / f"{model}-x{scale}"), resume=False,
                                     pairs_root=str(REPO / "data/pairs"))
    result = train_generator(config)
    seconds = result.history[-1]["seconds"]  # the training interval alone, validation excluded
    return STEPS * BATCH / seconds


def inference_megapixels_per_s(generator: torch.nn.Module, scale: int, device: str, side: int = 256, repeats: int = 3) -> float:
    generator = generator.to(device).eval()
    x = torch.rand(1, 1, side, side, device=device)
    with torch.inference_mode():
        generator(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            generator(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    return (side * scale) ** 2 / 1e6 / seconds


def main() -> None:
    from medsr.atomic import write_json
    from medsr.models import build_generator
    from medsr.params import load_params
    from medsr.training import TrainConfig

    os.chdir(REPO)
    if not (REPO / "data/pairs/train").is_dir():
        subprocess.run(["dvc", "repro", "degrade"], check=True)
    params = load_params(REPO / "params.yaml")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads(),
                                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                    "setup": {"batch": BATCH, "lr_patch": LR_PATCH, "steps_timed": STEPS, "inference_lr_side": 256,
                              "model_options": "params.yaml train.models (the sample profile's sizes)"},
                    "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for device in devices:
            for model in params["train"]["models"]:  # the models the pipeline trains
                for scale in (2, 4):
                    options = TrainConfig.from_params(params, model, scale).model_options
                    generator = build_generator(model, scale, **options)
                    entry = result["models"].setdefault(model, {}).setdefault(f"x{scale}", {})
                    entry[device] = {
                        "training_patches_per_s": round(training_patches_per_s(params, model, scale, device, Path(scratch)), 1),
                        "inference_megapixels_per_s": round(inference_megapixels_per_s(generator, scale, device), 3),
                    }
                    print(model, f"x{scale}", device, entry[device], flush=True)
    write_json(REPO / "benchmarks/results/models.json", result)


if __name__ == "__main__":
    main()
