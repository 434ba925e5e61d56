"""Orchestration benchmark: what DVC, Prefect and the registry cost when there is nothing to do.

* ``dvc_repro_noop_seconds``: ``dvc repro`` on an up-to-date pipeline (DVC hashing and lock only);
* ``flow_noop_seconds``: the ``medsr_pipeline`` flow on the same pipeline (one ``dvc repro <stage>``
  per stage, each a task), with ``flow_overhead_seconds`` = flow wall time minus the time its dvc
  processes ran (Prefect's own cost) and ``flow_vs_dvc_repro_seconds`` = flow minus one plain
  ``dvc repro`` (what orchestrating stage by stage costs in all);
* ``flow_first_run_seconds``: the first flow run of the process, which also starts Prefect's
  ephemeral server when no ``PREFECT_API_URL`` is set;
* ``registry_review_seconds``: ``medsr.registry.review`` in-process, and ``medsr registry review``
  as a fresh process (imports included).

The pipeline must be up to date: if ``dvc status`` says otherwise, ``dvc repro`` runs first (after
``make run`` it is a no-op). Writes benchmarks/results/orchestration.json.

    python benchmarks/bench_orchestration.py [--repo PATH] [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "orchestration.json"


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"bench_orchestration: {' '.join(args[:3])} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="repository whose pipeline to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the JSON")
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path.insert(0, str(REPO))  # flows/ is imported from the repository, as its deployment does

    from flows.pipeline import dvc_command, medsr_pipeline, pipeline_stages, subprocess_env

    env = subprocess_env()
    dvc = dvc_command()
    status = subprocess.run([*dvc, "status", "--quiet"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if status.returncode != 0:
        print("bench_orchestration: the pipeline is not up to date; running `dvc repro` first", flush=True)
        _timed([*dvc, "repro"], repo, env)

    result: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version()},
                              "repeats": args.repeats, "prefect_api_url": os.environ.get("PREFECT_API_URL", "ephemeral")}
    dvc_noop = [_timed([*dvc, "repro"], repo, env) for _ in range(args.repeats)]
    result["dvc_repro_noop_seconds"] = round(statistics.median(dvc_noop), 3)

    os.chdir(repo)
    always_run = {spec.name for spec in pipeline_stages(repo) if spec.always_changed}  # run even on a no-op
    flow_runs: list[tuple[float, float, int]] = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        state = medsr_pipeline(repo=str(repo), return_state=True)
        wall = time.perf_counter() - started
        if not state.is_completed():
            raise SystemExit(f"bench_orchestration: the flow failed: {state.message}")
        stages = state.result()["stages"]
        if any(s["ran"] and s["stage"] not in always_run for s in stages):
            raise SystemExit("bench_orchestration: a stage ran during the no-op flow; run `dvc repro` and retry")
        flow_runs.append((wall, sum(s["seconds"] for s in stages), len(stages)))
    first, warm = flow_runs[0], flow_runs[1:]
    flow_noop = statistics.median(w for w, _, _ in warm)
    result.update(
        flow_first_run_seconds=round(first[0], 3),
        flow_noop_seconds=round(flow_noop, 3),
        flow_stages=warm[0][2],
        flow_dvc_seconds=round(statistics.median(d for _, d, _ in warm), 3),
        flow_overhead_seconds=round(statistics.median(w - d for w, d, _ in warm), 3),
        flow_vs_dvc_repro_seconds=round(flow_noop - result["dvc_repro_noop_seconds"], 3),
    )

    from medsr.params import load_params
    from medsr.registry import review

    params = load_params(repo / "params.yaml")
    review(params)  # warm-up: imports, database connection
    in_process = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        review(params)
        in_process.append(time.perf_counter() - started)
    cli = [_timed([sys.executable, "-m", "medsr.registry_cli", "review"], repo, env) for _ in range(args.repeats)]
    result["registry_review_seconds"] = {"in_process": round(statistics.median(in_process), 3),
                                         "cli_process": round(statistics.median(cli), 3)}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
