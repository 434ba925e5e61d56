"""The ``medsr_pipeline`` flow: every DVC stage of dvc.yaml, in file order, as a Prefect task that
runs ``dvc repro <stage>``.

Why ``dvc repro`` rather than calling ``medsr.pipeline`` in-process: DVC stays the one judge of
what is stale (a flow run after ``make run`` retrains nothing), ``dvc.lock`` stays true for
``make run``, ``dvc status`` and ``dvc push``, and every task runs in its own process, so a crash or
a leak in one stage cannot take the orchestrator down. The price is about a second of DVC start-up
per stage (``make bench`` measures it).

Faults:

* A failing stage is retried per ``params.yaml: flows`` (download: with exponential backoff;
  train: once, and ``models/<name>`` is a persist output so the retry resumes from the last
  checkpoint; the rest: not at all, they are deterministic).
* DVC deletes a stage's non-persist outputs before running it; when the stage then fails, the task
  puts the last good ones back (``dvc checkout`` for cached outputs, a snapshot for uncached
  metrics), so a failed download leaves ``data/interim`` and everything downstream as it was.
* The run ends Failed with a one-line reason (the stage and the stage's own error line).
* Interrupted (Ctrl-C, a Prefect cancellation's SIGTERM), the task stops the whole ``dvc`` process
  group, so no orphaned stage keeps the DVC lock; the next run resumes training from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed, State
from prefect.tasks import exponential_backoff

from medsr.dvc_stages import DvcYamlError, expanded_stages
from medsr.params import ParamsError, load_params, parse_yaml

STAGE_RAN = re.compile(r"^Running stage '([^']+)'")
PROGRESS_BAR = re.compile(r"\d+%\|")
DVC_ERROR = re.compile(r"^ERROR: ")
REASON_TAIL_LINES = 40


class StageError(RuntimeError):
    """A stage failed; the message is one line: the stage and why."""


# ---------------------------------------------------------------------------------------------
# What dvc.yaml declares


@dataclass(frozen=True)
class StageSpec:
    """One stage of dvc.yaml (a ``foreach`` stage expands to ``train@<item>`` entries)."""

    name: str
    cached_outs: tuple[str, ...]  # restored with `dvc checkout` when the stage fails
    uncached_outs: tuple[str, ...]  # metrics/plots with cache: false: snapshotted before the run
    persist_outs: tuple[str, ...]  # never touched: resumable downloads and checkpoints live here
    always_changed: bool = False  # DVC runs it on every repro (the `sources` fingerprint)


def _out_entries(entries: list[Any] | None, *, cache_default: bool) -> list[tuple[str, bool, bool]]:
    """(path, cached, persist) of every out-like entry (``outs``, ``metrics``, ``plots``)."""
    found = []
    for entry in entries or []:
        if isinstance(entry, str):
            found.append((entry, cache_default, False))
        elif isinstance(entry, dict):
            for path, options in entry.items():
                options = options or {}
                found.append((str(path), bool(options.get("cache", cache_default)), bool(options.get("persist", False))))
    return found


def _spec(name: str, body: dict[str, Any]) -> StageSpec:
    outs = (_out_entries(body.get("outs"), cache_default=True) + _out_entries(body.get("metrics"), cache_default=True)
            + _out_entries(body.get("plots"), cache_default=True))
    return StageSpec(name=name,
                     cached_outs=tuple(p for p, cached, persist in outs if cached and not persist),
                     uncached_outs=tuple(p for p, cached, persist in outs if not cached and not persist),
                     persist_outs=tuple(p for p, _cached, persist in outs if persist),
                     always_changed=bool(body.get("always_changed", False)))


def pipeline_stages(repo: Path) -> list[StageSpec]:
    """The stages of ``repo/dvc.yaml`` in file order (which is the pipeline's order)."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise StageError(f"{path} not found: pass the repository root as `repo`")
    try:
        stages = expanded_stages(parse_yaml(path.read_text()) or {}, load_params(Path(repo) / "params.yaml"))
    except (DvcYamlError, ParamsError) as err:
        raise StageError(str(err)) from None
    return [_spec(name, body) for name, body in stages.items()]


# ---------------------------------------------------------------------------------------------
# Retry policy (params.yaml: flows)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff_seconds: float

    def task_options(self) -> dict[str, Any]:
        delays = exponential_backoff(backoff_factor=self.backoff_seconds)(self.retries) if self.retries else 0
        return {"retries": self.retries, "retry_delay_seconds": delays}


def retry_policy(params: dict[str, Any], stage: str) -> RetryPolicy:
    """download and pretrained (network fetches) -> flows.download, train@* -> flows.train, the rest ->
    flows.default."""
    cfg = params.get("flows") or {}
    key = ("download" if stage in ("download", "pretrained")
           else "train" if stage.split("@")[0] == "train" else "default")
    chosen = cfg.get(key) or {}
    return RetryPolicy(retries=int(chosen.get("retries", 0)), backoff_seconds=float(chosen.get("backoff_seconds", 0.0)))


# ---------------------------------------------------------------------------------------------
# Running dvc


def dvc_command() -> list[str]:
    """The dvc of this interpreter's environment (the venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return [str(beside)] if beside.is_file() else ["dvc"]


def subprocess_env() -> dict[str, str]:
    """The environment for dvc: the venv first on PATH (stage commands say plain `python`), output unbuffered."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("COLUMNS", "200")  # rich wraps one-line errors at 80 columns otherwise
    return env


@dataclass
class CommandResult:
    returncode: int
    lines: list[str]
    seconds: float


def run_logged(args: list[str], cwd: Path, logger: Any) -> CommandResult:
    """Run ``args`` in ``cwd``, streaming every output line to ``logger``; keeps the tail for errors.

    The child gets its own process group so that an interrupt (Ctrl-C, SIGTERM from a Prefect
    cancellation) stops dvc *and* the stage it runs, rather than orphaning the stage holding the
    DVC lock.
    """
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=REASON_TAIL_LINES)
    process = subprocess.Popen(args, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1, start_new_session=True)
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail.append(line)
            # Progress bars redraw dozens of times; keep them out of the run log.
            (logger.debug if PROGRESS_BAR.search(line) else logger.info)(line)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            _stop_group(process)
    return CommandResult(returncode, list(tail), time.perf_counter() - started)


def _stop_group(process: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failure_reason(lines: list[str]) -> str:
    """The stage's own last error line (e.g. ``medsr download: ...``), else DVC's."""
    meaningful = [line.strip() for line in lines if line.strip() and not PROGRESS_BAR.search(line)]
    own = [line for line in meaningful if not DVC_ERROR.match(line) and not line.startswith(("Running stage", "> ", "WARNING: "))]
    if own:
        return own[-1]
    dvc_errors = [line for line in meaningful if DVC_ERROR.match(line)]
    return (dvc_errors or meaningful or ["no output"])[-1]


def _snapshot(repo: Path, paths: tuple[str, ...]) -> dict[str, bytes]:
    """The current bytes of the uncached outputs (metrics and plots are small)."""
    saved: dict[str, bytes] = {}
    for relative in paths:
        path = repo / relative
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in files:
            saved[file.relative_to(repo).as_posix()] = file.read_bytes()
    return saved


def restore_outputs(repo: Path, spec: StageSpec, snapshot: dict[str, bytes], logger: Any) -> None:
    """Put back what DVC deleted before the failed run: cached outs from the cache, the rest from the snapshot."""
    for relative, data in snapshot.items():
        target = repo / relative
        if not target.is_file() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    if spec.cached_outs:
        # Only non-persist outs: persist ones (data/raw, models/<name>) hold resumable state.
        result = run_logged([*dvc_command(), "checkout", "--force", *spec.cached_outs], repo, logger)
        if result.returncode != 0:
            logger.warning("could not restore %s from the DVC cache (%s); the next run rebuilds them",
                           ", ".join(spec.cached_outs), failure_reason(result.lines))


# ---------------------------------------------------------------------------------------------
# Tasks and flow


@task(name="dvc-repro", task_run_name="dvc repro {stage}")
def reproduce_stage(stage: str, repo: str, force: bool = False) -> dict[str, Any]:
    """``dvc repro [--force] <stage>``: DVC runs it only if its deps, params or code changed."""
    logger = get_run_logger()
    root = Path(repo)
    spec = next((s for s in pipeline_stages(root) if s.name == stage), None)
    if spec is None:
        raise StageError(f"stage {stage}: not in {root / 'dvc.yaml'}")
    snapshot = _snapshot(root, spec.uncached_outs)
    args = [*dvc_command(), "repro", *(["--force"] if force else []), stage]
    logger.info("$ %s", " ".join(["dvc", *args[1:]]))
    result = run_logged(args, root, logger)
    ran = [m.group(1) for m in (STAGE_RAN.match(line) for line in result.lines) if m]
    if result.returncode != 0:
        restore_outputs(root, spec, snapshot, logger)
        raise StageError(f"stage {stage} failed: {failure_reason(result.lines)}")
    logger.info("stage %s %s in %.1f s", stage, "ran" if stage in ran else "was up to date", result.seconds)
    return {"stage": stage, "ran": stage in ran, "seconds": round(result.seconds, 2)}


def read_register_record(repo: Path) -> dict[str, Any] | None:
    """metrics/register.json as the register stage last wrote it."""
    path = Path(repo) / "metrics" / "register.json"
    return json.loads(path.read_text()) if path.is_file() else None


@flow(name="medsr-pipeline", description="Every DVC stage in order (dvc repro <stage>), with retries; ends with the registry decision.")
def medsr_pipeline(repo: str = ".", force_download: bool = False) -> dict[str, Any] | State:
    """Reproduce the pipeline in ``repo``; returns per-stage results and the registry's champions.

    ``force_download`` reruns the download stage even if DVC sees no change (new files in a
    ``local`` folder or a new upstream release are invisible to DVC's hashes).
    """
    from medsr.params import ParamsError, load_params

    logger = get_run_logger()
    root = Path(repo).resolve()
    try:
        params = load_params(root / "params.yaml")
        stages = pipeline_stages(root)
    except (ParamsError, StageError) as err:
        return Failed(message=str(err))
    results: list[dict[str, Any]] = []
    for spec in stages:
        runner = reproduce_stage.with_options(**retry_policy(params, spec.name).task_options())
        try:
            results.append(runner(spec.name, str(root), force=force_download and spec.name == "download"))
        except StageError as err:
            logger.error("%s", err)
            return Failed(message=str(err))
    register = read_register_record(root) if any(r["stage"] == "register" for r in results) else None
    registered_now = any(r["stage"] == "register" and r["ran"] for r in results)
    if register:
        for decision in register.get("decisions", {}).values():
            logger.info("%s: %s: %s", decision["registered_model"], decision["action"], decision["reason"])
    return {"repo": str(root), "stages": results, "registered_now": registered_now, "register": register}


def main() -> int:
    """``python -m flows.pipeline [REPO]``: run the flow once; exit 1 with the one-line reason on failure."""
    state = medsr_pipeline(repo=sys.argv[1] if len(sys.argv) > 1 else ".", return_state=True)
    if not state.is_completed():
        print(f"medsr-pipeline failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
