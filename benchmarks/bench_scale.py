"""The data pipeline at NIH size: N synthetic NIH-like 1024^2 8-bit PNGs through a `local` source.

For N = 200, 400 and 800 images (``--sizes``), in a temporary copy of the repository (the code,
params.yaml with one X-ray `local` source and nothing else, ``.dvc/config``), each data stage is
run by ``dvc repro <stage>`` in pipeline order, and measured:

* CPU seconds (user + sys) of the ``dvc`` process and every process it waited for: the stage's
  command and DVC's own hashing and committing (``os.wait4``'s rusage);
* wall seconds and peak RSS (the largest process of the stage);
* bytes on disk after the last data stage: the workspace's data and DVC's cache, each inode once
  (hard links are one file), allocated blocks.

The per-image cost is the slope of the least-squares line through the sizes (the intercept holds
the fixed costs: start-up, imports); ``extrapolation`` applies the line to NIH's sample subset
(5,606 images) and to the whole set (112,120). ``noop_repro_s``: a second ``dvc repro degrade`` at
the largest N, which must find nothing to do. Results: ``benchmarks/results/scale.json``.

The images: a chest-like field (a bright mediastinum and body, darker lungs, rib arcs), blurred,
with film-grain noise, so that PNG compresses it about as NIH's radiographs (~430 kB at 1024^2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "scale.json"
# What the copy leaves out: outputs, tracking stores, the benchmarks (not a stage's code).
SKIP = {".venv", ".git", "data", "reports", "mlruns", "mlartifacts", "mlflow.db", "models", "benchmarks", "plots",
        "tmp", "pretrained", "metrics", "dvc.lock", "__pycache__", ".pytest_cache"}
DATA_STAGES: tuple[str, ...] = ("sources", "download", "validate", "split", "degrade")
NIH_SIZES: dict[str, int] = {"nih_sample": 5_606, "nih_full": 112_120}
SIDE = 1024


def chest_like(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """One 8-bit NIH-like radiograph (see the module docstring)."""
    from scipy import ndimage

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    body = np.exp(-(((xx - 0.5) / 0.42) ** 6 + ((yy - 0.55) / 0.5) ** 6))
    image = 0.25 + 0.45 * body
    for cx in (0.32 + rng.uniform(-0.02, 0.02), 0.68 + rng.uniform(-0.02, 0.02)):  # lungs
        lung = np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.27) ** 2) ** 2)
        image -= 0.3 * lung
    image += 0.25 * np.exp(-(((xx - 0.5) / 0.07) ** 2 + ((yy - 0.55) / 0.4) ** 4))  # mediastinum
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(9, 11) + 0.15 * np.abs(xx - 0.5) ** 2 * 10))
    image += 0.06 * ribs * body
    image = ndimage.gaussian_filter(image, 2.0)
    image += rng.normal(0.0, 0.011, image.shape).astype(np.float32)  # film grain: PNG's ~430 kB
    return np.clip(image * 255.0, 0, 255).astype(np.uint8)


def write_images(folder: Path, count: int, seed: int = 0) -> float:
    """``count`` PNGs in ``folder``; returns their mean size in kB."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(chest_like(rng)).save(folder / f"{i:08d}_000.png", optimize=False)
    return sum(p.stat().st_size for p in folder.iterdir()) / count / 1e3


def copy_repo(dest: Path, images: Path) -> Path:
    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in {"__pycache__", ".pytest_cache"}} | (
            SKIP & set(names) if Path(folder) == REPO_ROOT else set())

    shutil.copytree(REPO_ROOT, dest, ignore=skip)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["sources"] = {"xray": {"kind": "local", "local": {"path": str(images)}}}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(["config", "--local", "core.site_cache_dir", str(dest.parent / "dvc-site")], dest)
    return dest


def _env(repo: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", PYTHONPATH=str(repo),
                DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true")


def dvc(args: list[str], repo: Path) -> dict[str, Any]:
    """Run ``dvc <args>`` in ``repo``; its CPU (with every process it waited for), wall time, peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("dvc")), *args], cwd=repo, env=_env(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "wall_s": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "output": output}


def disk_bytes(roots: list[Path], seen: set[tuple[int, int]]) -> int:
    """Allocated bytes of the files under ``roots``, each inode once (``seen`` carries over)."""
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                info = os.lstat(os.path.join(folder, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def run_size(n: int, images: Path, work: Path) -> dict[str, Any]:
    folder = work / f"images-{n}"
    folder.mkdir()
    for source in sorted(images.iterdir())[:n]:
        os.link(source, folder / source.name)
    repo = copy_repo(work / f"repo-{n}", folder)
    stages = {}
    for stage in DATA_STAGES:
        measured = dvc(["repro", "--single-item", stage], repo)  # this stage alone, its inputs already there
        measured.pop("output")
        stages[stage] = measured
        print(f"  N={n} {stage}: {measured}", flush=True)
    seen: set[tuple[int, int]] = set()
    data = repo / "data"
    disk = {part: round(disk_bytes([data / part], seen) / 1e6, 1)
            for part in ("raw", "interim", "validated", "split", "pairs")}
    disk["cache"] = round(disk_bytes([repo / ".dvc" / "cache"], seen) / 1e6, 1)  # what is not a link of the above
    disk["total"] = round(sum(disk.values()), 1)
    tracked = sum(1 for _ in (repo / ".dvc" / "cache" / "files").rglob("*") if _.is_file())
    result = {"images": n, "stages": stages, "data_cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 2),
              "data_wall_s": round(sum(s["wall_s"] for s in stages.values()), 2), "disk_mb": disk,
              "cache_objects": tracked}
    return result


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 800])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medsr-scale-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        png_kb = write_images(work / "images", max(args.sizes))
        print(f"{max(args.sizes)} images, {png_kb:.0f} kB each, in {time.perf_counter() - started:.0f} s", flush=True)
        runs = [run_size(n, work / "images", work) for n in sorted(args.sizes)]
        largest = work / f"repo-{max(args.sizes)}"
        noop = dvc(["repro", "degrade"], largest)
        ran = [line for line in noop["output"].splitlines() if line.startswith("Running stage")]
    ns = [r["images"] for r in runs]
    cpu_slope, cpu_intercept = fit(ns, [r["data_cpu_s"] for r in runs])
    disk_slope, disk_intercept = fit(ns, [r["disk_mb"]["total"] for r in runs])
    stage_ms = {stage: round(fit(ns, [r["stages"][stage]["cpu_s"] for r in runs])[0] * 1000, 1) for stage in DATA_STAGES}
    disk_parts = {part: round(fit(ns, [r["disk_mb"][part] for r in runs])[0], 3) for part in runs[0]["disk_mb"]
                  if part != "total"}
    result = {
        "what": "N synthetic NIH-like 1024^2 8-bit PNGs through a local source, dvc repro through degrade",
        "png_kb": round(png_kb, 1),
        "per_image": {"disk_mb": round(disk_slope, 3), "data_cpu_ms": round(cpu_slope * 1000, 1),
                      "cpu_ms_per_stage": stage_ms, "disk_mb_per_part": disk_parts},
        "fixed": {"disk_mb": round(disk_intercept, 1), "data_cpu_s": round(cpu_intercept, 1)},
        "runs": runs,
        "extrapolation": {str(n): {"name": name, "disk_gb": round((disk_intercept + disk_slope * n) / 1e3, 1),
                                   "data_cpu_min": round((cpu_intercept + cpu_slope * n) / 60, 1)}
                          for name, n in NIH_SIZES.items()},
        "noop_repro_s": noop["wall_s"],
        "noop_repro_ran": ran,
        "targets": {"disk_mb": 3.0, "data_cpu_ms": 60.0, "noop_repro_s": 5.0},
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, args.out)  # written aside and moved: a killed run leaves the last result whole
    print(json.dumps({k: result[k] for k in ("per_image", "extrapolation", "noop_repro_s")}, indent=1))


if __name__ == "__main__":
    main()
