"""Data benchmark: seconds per data stage on the embedded sample, and images/s for loading and
degrading. Runs in a scratch folder so the repository's own data/ is untouched.

Writes benchmarks/results/data.json.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    # Imported here, not at the top: spawned worker processes re-import this module as __mp_main__,
    # and a top-level torch import would cost every ingest worker ~1.7 s of CPU in the timings.
    import torch

    from medsr import degradations as deg
    from medsr.atomic import write_json
    from medsr.data import MODALITIES
    from medsr.data.loading import load_image
    from medsr.data.sources.sample import fetch_sample
    from medsr.params import load_params
    from medsr.pipeline import degrade_stage, download_stage, split_stage, validate_stage

    params = load_params(REPO / "params.yaml")
    result: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "torch_threads": torch.get_num_threads()}}
    with tempfile.TemporaryDirectory() as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            shutil.copy(REPO / "params.yaml", "params.yaml")
            stages = {}
            for name, func in (("download", download_stage), ("validate", validate_stage),
                               ("split", split_stage), ("degrade", degrade_stage)):
                start = time.perf_counter()
                func(params)
                stages[name] = round(time.perf_counter() - start, 3)
            result["stage_seconds"] = stages

            raw = Path("raw-bench")
            files = []
            for modality in MODALITIES:
                files += [(p, modality) for p in fetch_sample(modality, raw / modality)]
            data = params["data"]
            start = time.perf_counter()
            images = []
            for path, modality in files:
                images += load_image(path, modality, max_pixels=int(data["max_pixels"]), slice_step=int(data["volume_slice_step"]),
                                     min_foreground_fraction=float(data["min_foreground_fraction"]))
            seconds = time.perf_counter() - start
            megapixels = sum(i.pixels.size for i in images) / 1e6
            result["loading"] = {"files": len(files), "images": len(images), "seconds": round(seconds, 3),
                                 "images_per_s": round(len(images) / seconds, 1), "megapixels_per_s": round(megapixels / seconds, 2)}

            import pandas as pd

            from medsr.data.ingest import TABLE_NAME
            from medsr.data.shards import read_tile

            interim = Path("data/interim")
            stored = pd.read_parquet(interim / TABLE_NAME).dropna(subset=["offset"])
            tiles = [read_tile(interim, row) for row in stored.itertuples()]
            cfg = params["degrade"]
            for scale in cfg["scales"]:
                rng = deg.rng_for(0, "bench")
                start = time.perf_counter()
                for tile in tiles:
                    hr = deg.crop_to_multiple(tile, scale)
                    deg.degrade_standard(hr, scale, blur_sigma=float(cfg["blur_sigma"]), noise_kind="poisson", noise_level=0.01, rng=rng)
                standard = time.perf_counter() - start
                start = time.perf_counter()
                for tile in tiles:
                    hr = deg.crop_to_multiple(tile, scale)
                    deg.degrade_blind(hr, scale, blur_sigma=tuple(cfg["blind"]["blur_sigma"]),
                                      resize_factor=tuple(cfg["blind"]["resize_factor"]), noise_level=tuple(cfg["blind"]["noise_level"]),
                                      jpeg_quality=tuple(cfg["blind"]["jpeg_quality"]), rng=rng)
                blind = time.perf_counter() - start
                result.setdefault("degrading", {})[f"x{scale}"] = {
                    "images": len(tiles),
                    "standard_images_per_s": round(len(tiles) / standard, 1),
                    "blind_images_per_s": round(len(tiles) / blind, 1),
                }
            result["parallel_degrade"] = parallel_degrade(params["degrade"], Path("parallel"))
            result["parallel_ingest"] = parallel_ingest(params["data"], Path("parallel-ingest"))
        finally:
            os.chdir(cwd)
    out = REPO / "benchmarks" / "results" / "data.json"
    write_json(out, result)
    print(out.read_text())


def best_of_alternating(run: Callable[[int, Path], object], scratch: Path, prefix: str,
                        repeats: int) -> tuple[dict[int, tuple[float, float]], bool, object]:
    """``run(workers, folder)`` at 1, 2, 1, 2 ... workers, ``repeats`` times each, so a burst of load
    from other jobs does not land on one side only. Returns the best (seconds, CPU seconds of this
    process and its workers) per worker count, whether every run wrote the same files and bytes,
    and the last run's return value."""
    import hashlib
    import resource

    def cpu() -> float:
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    digests, best, result = set(), {}, None
    for _ in range(repeats):
        for workers in (1, 2):
            folder = scratch / f"{prefix}-{workers}"
            start, cpu_start = time.perf_counter(), cpu()
            result = run(workers, folder)
            seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
            digests.add(tuple((p.relative_to(folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                              for p in sorted(folder.rglob("*")) if p.is_file()))
            if workers not in best or seconds < best[workers][0]:
                best[workers] = (seconds, cpu_seconds)
    return best, len(digests) == 1, result


def parallel_degrade(cfg: dict, scratch: Path, n_images: int = 2000, side: int = 256, repeats: int = 2) -> dict:
    """Degrade throughput of build_pair_sets at 1 and 2 worker processes on the same synthetic images.

    The written evaluation tracks (``degrade.tracks``) of the test split at x4, from 8-bit tiles in
    one shard as ingest stores them (training pairs are degraded as training draws them). As in :func:`parallel_ingest`, runs alternate 1, 2, 1, 2 ...
    and the best of ``repeats`` counts; ``cpu_seconds`` covers this process and its workers. Checks
    that every run wrote the same bytes. ``worker_start_seconds``: how long a fresh pool of 2 workers
    takes to answer (each imports torch), a fixed cost inside the 2-worker time: 2,000 images keep it
    near a tenth of the run, where a user's data set makes it vanish.
    """
    import pandas as pd
    from scipy.ndimage import gaussian_filter

    from medsr.data.pairing import build_pair_sets, parallel_mapper
    from medsr.data.shards import ShardWriter, encode

    start = time.perf_counter()
    with parallel_mapper(2) as mapper:
        list(mapper(abs, [-1, -2]))
        worker_start = time.perf_counter() - start
    scratch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = [np.clip(gaussian_filter(rng.random((side, side)), 2.0) * 3 - 1, 0, 1).astype(np.float32)[None] for _ in range(8)]
    base = [(np.rint(b * 255) / 255).astype(np.float32) for b in base]  # 8-bit images, as NIH's
    rows = []
    shards = ShardWriter(scratch)
    for i in range(n_images):
        array, offset = shards.append(encode(np.roll(base[i % 8], i, axis=2)))
        rows.append({"id": f"xray-{i:05d}", "modality": "xray", "array": array, "offset": offset,
                     "height": side, "width": side, "split": "test"})
    shards.close()
    table = pd.DataFrame(rows)
    params = {**cfg, "scales": [4]}
    tracks = list(params.get("tracks", ["clean", "realistic"]))
    out: dict = {"images": n_images, "side": side, "scale": 4, "kinds": tracks,
                 "repeats": repeats, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    best, identical, _ = best_of_alternating(
        lambda workers, folder: build_pair_sets(table, scratch, folder, params, workers=workers), scratch, "pairs", repeats)
    for workers, (seconds, cpu_seconds) in best.items():
        out[f"workers_{workers}"] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                                     "pairs_per_s": round(len(tracks) * n_images / seconds, 1)}
    out["worker_start_seconds"] = round(worker_start, 2)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["speedup_2_workers"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    out["identical_bytes"] = identical
    return out


def parallel_ingest(data: dict, scratch: Path, n_files: int = 1200, side: int = 512, repeats: int = 2) -> dict:
    """Ingest throughput (decode, window, tile, store in shards) at 1 and 2 worker processes on the same files.

    ``n_files`` synthetic 16-bit PNG radiographs, each cut into (side/tile_size)^2 tiles. Runs
    alternate 1, 2, 1, 2 ... and the best of ``repeats`` counts, so a burst of load from other jobs
    does not land on one side only; timings include spawning the workers. ``cpu_seconds`` (this
    process and its workers) shows how much of a shortfall is the parallel path's own work rather
    than cores taken by others. Checks that every run wrote the same bytes.
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from medsr.data.ingest import IngestOptions, ingest

    raw = scratch / "raw"
    (raw / "xray").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Smooth anatomy-like backgrounds plus noise: decodes and windows like a real radiograph, and
    # rolling a few bases keeps writing the inputs (untimed) quick.
    base = [(np.clip(gaussian_filter(rng.random((side, side)), 8.0) * 6 - 2.5, 0, 1) * 60000).astype(np.uint16)
            for _ in range(8)]
    for i in range(n_files):
        pixels = np.roll(base[i % 8], i, axis=1) + rng.integers(0, 2000, (side, side), dtype=np.uint16)
        Image.fromarray(pixels).save(raw / "xray" / f"{i:05d}.png")
    options = IngestOptions.from_params(data)
    out: dict = {"files": n_files, "side": side, "tile_size": options.tile_size, "format": "16-bit PNG",
                 "repeats": repeats, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    best, identical, table = best_of_alternating(
        lambda workers, folder: ingest(raw, folder, options, {"xray": "local"}, workers=workers), scratch, "interim",
        repeats)
    for workers, (seconds, cpu_seconds) in best.items():
        out[f"workers_{workers}"] = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                                     "files_per_s": round(n_files / seconds, 1),
                                     "tiles_per_s": round(len(table) / seconds, 1)}
    out["tiles"] = int(len(table))
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["speedup_2_workers"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 2)
    out["identical_bytes"] = identical
    return out


if __name__ == "__main__":
    main()
