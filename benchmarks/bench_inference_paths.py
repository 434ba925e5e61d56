"""Inference paths per architecture on this CPU: eager (contiguous weights), channels_last, and
``torch.compile`` (inductor, C++ codegen) over the faster layout, at x4 on a 256x256 input: the
median forward time at the service's two torch threads, the compile time, and the largest
difference from the eager output (parity). What :func:`medsr.inference.choose_memory_format`
picks from, and why the service does not compile (see the README's serving section).
Writes benchmarks/results/inference_paths.json.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIDE, SCALE, REPEATS = 256, 4, 5


def median_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    from medsr.inference import median_forward_seconds

    return median_forward_seconds(model, x, REPEATS) * 1000


def main() -> None:
    from medsr.atomic import write_json
    from medsr.models import build_generator, model_names
    from medsr.params import load_params
    from medsr.training import TrainConfig

    torch.set_num_threads(2)
    params = load_params(REPO / "params.yaml")
    x = torch.rand(1, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    rows = {}
    for name in model_names(trained=True):
        options = TrainConfig.from_params(params, name, SCALE).model_options  # the sample profile's sizes
        model = build_generator(name, SCALE, **options).eval()
        with torch.inference_mode():
            reference = model(x)
        row = {"params": sum(p.numel() for p in model.parameters()), "eager_ms": median_ms(model, x)}
        model.to(memory_format=torch.channels_last)
        row["channels_last_ms"] = median_ms(model, x)
        layout = "channels_last" if row["channels_last_ms"] < row["eager_ms"] else "contiguous"
        if layout == "contiguous":
            model.to(memory_format=torch.contiguous_format)
        started = time.perf_counter()
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            out = compiled(x)  # the first call compiles
        row["compile_seconds"] = round(time.perf_counter() - started, 1)
        row["compiled_ms"] = median_ms(compiled, x)
        row["compiled_max_abs_diff"] = float((out - reference).abs().max())
        row["compiled_layout"] = layout
        best = min(("eager", row["eager_ms"]), ("channels_last", row["channels_last_ms"]),
                   ("compiled", row["compiled_ms"]), key=lambda item: item[1])
        row["fastest"] = best[0]
        rows[name] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
        print(name, rows[name], flush=True)
        torch._dynamo.reset()
    out = {"input": f"1x1x{SIDE}x{SIDE}, x{SCALE}", "torch_threads": 2, "repeats": REPEATS, "models": rows,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "load_average_at_end": os.getloadavg()}}
    write_json(REPO / "benchmarks" / "results" / "inference_paths.json", out)


if __name__ == "__main__":
    main()
