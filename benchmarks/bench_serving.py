"""Serving benchmark: /upscale of a 256x256 16-bit PNG chest X-ray tile at x4, against the bare model.

What a viewer does: send one image file, wait for the upscaled file. Measured in one run:

* ``bare_forward_ms``: the network alone, 256^2 -> 1024^2, in this process, in the weight layout
  the service picks (:func:`medsr.inference.choose_memory_format`), the best of 1 and 2 torch
  threads (so the ratio is against the model's own best speed here);
* ``bare_throughput``: images/s of the network alone, the best of one forward at a time (2
  torch threads) and two at a time (1 torch thread each); both bare numbers are timed right
  before the level they are compared with (``adjacent_bare``), the machine being shared;
* ``/upscale`` latency (p50/p95/p99) and images/s at 1, 4, 16 and 64 concurrent clients, with the
  service as params.yaml configures it; a client answered 429 (expected wait over
  ``serving.max_wait_s``) waits ``Retry-After`` and sends again, as a viewer would: ``p*_ms`` are
  of the answered attempts, ``end_to_end_p*_ms`` include the waits and retries, and
  ``retrying_clients`` sums up what a client sees per level (images/s, end-to-end p50/p99, 429s),
  with the issue's targets in ``targets``;
* the phase breakdown: the median ``Server-Timing`` entry per phase at 1 client;
* the same with the consistency step (``serving.refine``) switched the other way, to show its cost.

The model is an untrained ESPCN x4 in a scratch registry: the issue's champion architecture (its
speed does not depend on its weights), and the lead's registry is left alone. Writes
benchmarks/results/serving.json.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serving` is not an installed package

CONCURRENCY: tuple[int, ...] = (1, 4, 16, 64)
REQUESTS_PER_LEVEL: dict[int, int] = {1: 24, 4: 32, 16: 64, 64: 192}
TILE = 256
SCALE = 4


def chest_xray_png() -> bytes:
    """The central 256x256 of the embedded chest CR as a 16-bit PNG."""
    from PIL import Image

    from medsr.data.loading import load_dicom
    from medsr.data.sample_files import sample_file

    image = load_dicom(sample_file("pydicom-data", "RG1_UNCI.dcm"), "xray")[0].pixels
    _, height, width = image.shape
    top, left = (height - TILE) // 2, (width - TILE) // 2
    tile = np.rint(image[0, top:top + TILE, left:left + TILE] * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


def bare_model(module: Any, repeats: int = 12) -> dict[str, Any]:
    """Forward times and throughput of the bare module, timed in worker threads as BentoML runs them."""
    import torch

    from medsr.inference import forward

    single = np.random.default_rng(0).random((1, 1, TILE, TILE), dtype=np.float32)

    def timed(count: int) -> list[float]:
        forward(module, single)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            forward(module, single)
            times.append(time.perf_counter() - started)
        return times

    result: dict[str, Any] = {}
    default_threads = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                result[f"forward_ms_torch_threads_{threads}"] = float(np.median(pool.submit(timed, repeats).result()) * 1000)
        torch.set_num_threads(2)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            started = time.perf_counter()
            pool.submit(timed, repeats).result()
            one_at_a_time = (repeats + 1) / (time.perf_counter() - started)
        torch.set_num_threads(1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            started = time.perf_counter()
            list(pool.map(timed, [repeats, repeats]))
            two_at_a_time = 2 * (repeats + 1) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(default_threads)
    result.update(images_per_s_one_at_a_time=one_at_a_time, images_per_s_two_at_a_time=two_at_a_time)
    result["bare_forward_ms"] = min(result["forward_ms_torch_threads_1"], result["forward_ms_torch_threads_2"])
    result["bare_throughput"] = max(one_at_a_time, two_at_a_time)
    return result


def run_level(url: str, png: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` /upscale calls from ``clients`` concurrent clients."""
    import httpx

    def client_loop(count: int) -> tuple[list[float], list[float], list[dict[str, float]], int]:
        attempts, end_to_end, timings, refused = [], [], [], 0
        with httpx.Client(base_url=url, timeout=300.0) as http:
            for _ in range(count):
                first = time.perf_counter()
                while True:
                    started = time.perf_counter()
                    response = http.post("/upscale", files={"file": ("tile.png", png)}, data={"scale": str(SCALE)})
                    if response.status_code != 429:
                        break
                    refused += 1
                    time.sleep(float(response.headers.get("retry-after", "1")))
                if response.status_code != 200:
                    raise RuntimeError(f"/upscale answered {response.status_code}: {response.text[:300]}")
                attempts.append(time.perf_counter() - started)
                end_to_end.append(time.perf_counter() - first)
                timings.append({name: float(ms) for name, ms in
                                re.findall(r"([a-z]+);dur=([0-9.]+)", response.headers["server-timing"])})
        return attempts, end_to_end, timings, refused

    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        parts = list(pool.map(client_loop, shares))
    wall = time.perf_counter() - started
    attempts = [v for part in parts for v in part[0]]
    end_to_end = [v for part in parts for v in part[1]]
    timings = [t for part in parts for t in part[2]]
    phases = sorted({name for t in timings for name in t})
    return {"clients": clients, "requests": requests, **percentiles(attempts),
            **{f"end_to_end_{key}": value for key, value in percentiles(end_to_end).items()},
            "refused_429": sum(part[3] for part in parts), "images_per_s": requests / wall, "wall_s": wall,
            "server_timing_median_ms": {name: float(np.median([t.get(name, 0.0) for t in timings])) for name in phases}}


def serve_and_measure(uri: str, params_path: Path, png: bytes, scratch: Path, label: str,
                      module: Any, fraction: float = 1.0) -> dict[str, Any]:
    """Every level of one service configuration, each right after a bare-model measurement.

    The machine is shared with other jobs whose load drifts within minutes: a level is compared
    with the bare model timed just before it (the service idle), not with one from another minute.
    """
    from serving import ServiceProcess

    levels: dict[str, Any] = {}
    with ServiceProcess(env={"MLFLOW_TRACKING_URI": uri, "MEDSR_PARAMS": str(params_path)},
                        log_path=scratch / f"service-{label.replace(' ', '-')}.log", device="cpu") as service:
        run_level(service.url, png, 2, 8)  # warm-up
        for clients in CONCURRENCY:
            bare = bare_model(module)
            level = run_level(service.url, png, clients, max(clients, round(REQUESTS_PER_LEVEL[clients] * fraction)))
            level["adjacent_bare"] = bare
            levels[str(clients)] = level
            print(f"{label} clients={clients}: {level}", flush=True)
    return levels


def retrying_clients(levels: dict[str, Any], bare_forward_ms: float, bare_throughput: float,
                     slots: int) -> tuple[dict[str, Any], dict[str, bool]]:
    """What a client that retries 429 after Retry-After sees per level, and the issue's targets:
    at 16 and 64 clients images/s >= 90% of bare and end-to-end p99 <= 2 x (clients / slots) x
    the bare forward + 1 s; at 1 client served/bare <= 1.5x."""
    seen = {key: {"images_per_s": level["images_per_s"], "p50_ms": level["end_to_end_p50_ms"],
                  "p99_ms": level["end_to_end_p99_ms"], "refused": level["refused_429"], "requests": level["requests"]}
            for key, level in levels.items()}
    targets = {"1 client: p50 <= 1.5 x bare forward": seen["1"]["p50_ms"] <= 1.5 * bare_forward_ms}
    for key in ("16", "64"):
        bound = 2 * (int(key) / slots) * bare_forward_ms + 1000.0
        targets[f"{key} clients: images/s >= 0.9 x bare"] = seen[key]["images_per_s"] >= 0.9 * bare_throughput
        targets[f"{key} clients: p99 <= {bound:.0f} ms"] = seen[key]["p99_ms"] <= bound
    return seen, targets


def summary(levels: dict[str, Any], slots: int = 2) -> dict[str, Any]:
    c1, c4, c16 = levels["1"], levels["4"], levels["16"]
    bare_forward_ms = c1["adjacent_bare"]["bare_forward_ms"]
    bare_throughput = c4["adjacent_bare"]["bare_throughput"]
    seen, client_targets = retrying_clients(levels, bare_forward_ms, bare_throughput, slots)
    return {
        "bare_forward_ms": bare_forward_ms,
        "bare_throughput": bare_throughput,
        "computing_slots": slots,
        "retrying_clients": seen,
        "retrying_clients_targets": client_targets,
        "served_p50_ms_c1": c1["p50_ms"],
        "served_over_bare_c1": c1["p50_ms"] / bare_forward_ms,
        "throughput_c4": c4["images_per_s"],
        "throughput_c4_over_bare": c4["images_per_s"] / bare_throughput,
        "p99_ms_c16": c16["p99_ms"],
        "p99_c16_over_p50_c1": c16["p99_ms"] / c1["p50_ms"],
        "phases_ms_c1": c1["server_timing_median_ms"],
        "targets": {"served_over_bare_c1 <= 2.5": c1["p50_ms"] / bare_forward_ms <= 2.5,
                    "throughput_c4 >= 0.5 x bare_throughput": c4["images_per_s"] >= 0.5 * bare_throughput,
                    "p99_c16 <= 4 x p50_c1": c16["p99_ms"] <= 4 * c1["p50_ms"]},
    }


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests, no refine-flipped run "
                        "(checks that the benchmark works; its numbers are noisier)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    arguments = parser.parse_args()
    fraction = 0.25 if arguments.quick else 1.0

    from medsr.atomic import write_json
    from serving import QUIET_ENV, load_config, register_generator

    os.environ.update(QUIET_ENV)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    config = load_config(REPO / "params.yaml")
    png = chest_xray_png()
    with tempfile.TemporaryDirectory(prefix="medsr-bench-serving-") as tmp:
        scratch = Path(tmp)
        uri = f"sqlite:///{scratch / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        register_generator("espcn", SCALE, artifact_dir=scratch / "artifacts")
        from medsr.inference import choose_memory_format, load_registered_generator

        generator = load_registered_generator(config.model_names[SCALE], SCALE, None, str(config.serving["alias"]))
        # The bare reference runs the model's fastest layout, as the service does.
        layout = choose_memory_format(generator.module)
        levels = serve_and_measure(uri, REPO / "params.yaml", png, scratch, "configured", generator.module, fraction)
        # The same service with the consistency step (serving.refine) switched the other way: what it costs.
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["serving"]["refine"] = not bool(params["serving"]["refine"])
        flipped_path = scratch / "params-refine-flipped.yaml"
        flipped_path.write_text(yaml.safe_dump(params))
        flipped = None if arguments.quick else serve_and_measure(uri, flipped_path, png, scratch, "refine flipped",
                                                                   generator.module)

    refine_on = bool(config.serving["refine"])
    slots = int(config.serving["threads"])
    output = {
        **summary(levels, slots),
        "quick": bool(arguments.quick),
        **({} if flipped is None else
           {("without_refine" if refine_on else "with_refine"): {**summary(flipped, slots), "levels": flipped}}),
        "levels": levels,
        "settings": {key: config.serving[key] for key in ("threads", "torch_threads", "max_in_flight", "max_wait_s", "png_level",
                                                          "refine", "tile", "tile_batch")},
        "consistency_step": config.consistency,
        "request": {"endpoint": "/upscale", "file": "16-bit PNG 256x256", "scale": SCALE, "output": "16-bit PNG 1024x1024",
                    "source": "pydicom-data RG1_UNCI.dcm (chest CR), central tile"},
        "model": {**generator.describe(), "memory_format": layout,
                  "note": "untrained espcn x4 in a scratch registry (same compute as a trained one)"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
        "how_to_read": "p*_ms: latency of answered attempts; end_to_end_p*_ms and retrying_clients add 429 waits "
                       "(Retry-After) and retries. "
                       "Server-Timing phases overlap (consistency runs beside encode), so their sum exceeds total. "
                       "The machine is shared with other work; load_average_at_end says how busy it was.",
    }
    out = arguments.out
    write_json(out, output)
    print(f"wrote {out}: served_over_bare_c1={output['served_over_bare_c1']:.2f} "
          f"throughput_c4={output['throughput_c4']:.2f} (bare {output['bare_throughput']:.2f}) "
          f"p99_c16={output['p99_ms_c16']:.0f} ms vs p50_c1={output['served_p50_ms_c1']:.0f} ms; "
          f"retrying clients {output['retrying_clients_targets']}")


if __name__ == "__main__":
    main()
