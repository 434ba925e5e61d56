"""Serving benchmark: latency and throughput of /upscale_array for a 256x256 chest X-ray tile at x4.

For 1, 4 and 16 concurrent clients, with adaptive batching on and off (two service starts), it
reports p50/p95/p99 request latency and images/s, next to the bare model's forward time measured
in the same run (so the ratio is the serving overhead: HTTP, JSON/base64, queueing, batching).

The model is the registry's ``medsr-x4@champion`` (``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in
the working directory, as after ``make run``); without one it registers an untrained ESPCN in a
scratch store and says so in the result. The tile is the centre of the embedded chest CR
(pydicom-data ``RG1_UNCI.dcm``), windowed by the loader.

Writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serving` is not an installed package

CONCURRENCY: tuple[int, ...] = (1, 4, 16)
TILE = 256
SCALE = 4


def chest_xray_tile() -> np.ndarray:
    """The central 256x256 of the embedded chest CR, as a contract image (1, 256, 256)."""
    from medsr.data.loading import load_dicom
    from medsr.data.sample_files import sample_file

    image = load_dicom(sample_file("pydicom-data", "RG1_UNCI.dcm"), "xray")[0].pixels
    _, height, width = image.shape
    top, left = (height - TILE) // 2, (width - TILE) // 2
    return np.ascontiguousarray(image[:, top:top + TILE, left:left + TILE])


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


def bare_forward(generator: Any, tile: np.ndarray, repeats: int = 10,
                 worker_thread: bool = True) -> dict[str, list[float]]:
    """Forward times (ms) of the bare module in this process: one tile, and per tile in a batch of 16.

    ``worker_thread``: time it in a worker thread, the way BentoML runs a sync API method. On
    this machine torch's CPU kernels run about twice as slowly from the main thread, so the
    main-thread number is kept only for reference.
    """
    from medsr.inference import forward

    single = tile[None]
    batch = np.repeat(single, 16, axis=0)

    def measure() -> dict[str, list[float]]:
        forward(generator.module, single)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(generator.module, single)
            times.append((time.perf_counter() - started) * 1000.0)
        started = time.perf_counter()
        forward(generator.module, batch)
        return {"batch1_ms": times, "batch16_per_image_ms": [(time.perf_counter() - started) * 1000.0 / 16]}

    if not worker_thread:
        return measure()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(measure).result()


def run_level(url: str, body: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` requests from ``clients`` concurrent clients; latency per request, images/s overall."""
    import httpx

    def client_loop(count: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=300.0) as http:
            for _ in range(count):
                started = time.perf_counter()
                response = http.post("/upscale_array", json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"/upscale_array answered {response.status_code}: {response.text[:300]}")
        return latencies

    shares = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = [value for part in pool.map(client_loop, shares) for value in part]
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": requests, **percentiles(latencies), "images_per_s": requests / wall,
            "wall_s": wall}


def serve_and_measure(batching: bool, env: dict[str, str], body: dict[str, Any], scratch: Path,
                      bare: Callable[[], dict[str, list[float]]]) -> dict[str, Any]:
    """Start the service with batching on or off and measure every concurrency level.

    The machine is shared, so the bare model is timed again right before each level (with the
    service idle) and each level's overhead ratio uses that adjacent measurement.
    """
    import yaml

    from serving import ServiceProcess

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("serving", {}).setdefault("batching", {})["enabled"] = batching
    params_path = scratch / f"params-batching-{batching}.yaml"
    params_path.write_text(yaml.safe_dump(params))
    levels: dict[str, Any] = {}
    with ServiceProcess(env={**env, "MEDSR_PARAMS": str(params_path)}, log_path=scratch / f"service-{batching}.log",
                        device="cpu") as service:
        run_level(service.url, body, 4, 12)  # warm-up (and the batching dispatcher's own calibration)
        for clients in CONCURRENCY:
            adjacent = bare()
            level = run_level(service.url, body, clients, max(16, 3 * clients))
            bare_ms = float(np.median(adjacent["batch1_ms"]))
            level.update(bare_forward_ms=bare_ms, p50_over_bare_forward=level["p50_ms"] / bare_ms,
                         bare_model_images_per_s=1000.0 / bare_ms)
            levels[str(clients)] = level
            print(f"batching={batching} clients={clients}: {level}", flush=True)
    return levels


def main() -> None:
    import torch

    from medsr.atomic import write_json
    from medsr.inference import ModelNotFoundError, load_registered_generator
    from serving import QUIET_ENV, register_generator, serving_params

    os.environ.update(QUIET_ENV)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tile = chest_xray_tile()
    body = {"images": [{"data": base64.b64encode(tile[0].astype("<f4").tobytes()).decode("ascii"),
                        "shape": [TILE, TILE], "scale": SCALE}]}
    serving, _ = serving_params()
    with tempfile.TemporaryDirectory(prefix="medsr-bench-serving-") as tmp:
        scratch = Path(tmp)
        env: dict[str, str] = {}
        generator = None
        if os.environ.get("MLFLOW_TRACKING_URI") or Path("mlflow.db").is_file():
            from medsr.tracking import tracking_uri

            env["MLFLOW_TRACKING_URI"] = tracking_uri()
            try:
                generator = load_registered_generator(SCALE, None, "cpu")
                model_note = "registry champion"
            except ModelNotFoundError as err:
                print(f"{err}: benchmarking an untrained ESPCN instead", flush=True)
        if generator is None:
            env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
            register_generator("espcn", SCALE, artifact_dir=scratch / "artifacts")
            generator = load_registered_generator(SCALE, None, "cpu")
            model_note = "untrained espcn (no champion registered: run `make run` first for the trained one)"

        samples: dict[str, list[float]] = {"batch1_ms": [], "batch16_per_image_ms": []}

        def timed_bare() -> dict[str, list[float]]:
            measured = bare_forward(generator, tile, repeats=5)
            for key, values in measured.items():
                samples[key] += values
            return measured

        results = {mode: serve_and_measure(enabled, env, body, scratch, timed_bare)
                   for mode, enabled in (("batching", True), ("no_batching", False))}
        main_thread = bare_forward(generator, tile, repeats=5, worker_thread=False)
        bare = {"batch1_median_ms": float(np.median(samples["batch1_ms"])),
                "batch1_p95_ms": float(np.percentile(samples["batch1_ms"], 95)),
                "batch16_per_image_median_ms": float(np.median(samples["batch16_per_image_ms"])),
                "samples": len(samples["batch1_ms"]), "measured_in": "a worker thread, as BentoML runs sync APIs",
                "main_thread_batch1_median_ms": float(np.median(main_thread["batch1_ms"]))}
        print(f"bare forward: {bare}", flush=True)

    output = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "model": {**generator.describe(), "note": model_note},
        "request": {"endpoint": "/upscale_array", "encoding": "base64 float32", "tile": [TILE, TILE], "scale": SCALE,
                    "images_per_request": 1, "source": "pydicom-data RG1_UNCI.dcm (chest CR), central tile"},
        "batching_settings": serving["batching"],
        "bare_forward": bare,
        "serving": results,
        "how_to_read": "per level: p50_over_bare_forward = median request latency / the bare single-tile forward "
                       "time measured in this process just before that level (the machine is shared, so each "
                       "level has its own); images_per_s against bare_model_images_per_s shows what serving "
                       "costs or gains. bare_forward sums up every bare measurement of the run.",
    }
    out = REPO / "benchmarks" / "results" / "serving.json"
    write_json(out, output)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
