"""The ``retrain`` flow: pull new data, reproduce, compare challenger with champion, promote or keep.

1. **pull new data**: ``dvc pull`` when a DVC remote is configured (outputs a teammate or another
   worker already built), then ``dvc repro --force download`` so the sources are fetched again
   (new files in a ``local`` folder are invisible to DVC until the stage reruns). When the data
   came out byte-identical, DVC skips everything downstream.
2. **reproduce**: the ``medsr_pipeline`` flow as a subflow; its last stage, ``register``, selects the
   best model per scale, registers it, compares it with the champion on the same test split
   (re-evaluating the champion when the data version changed) and moves ``champion`` or
   ``challenger`` (medsr/registry.py). Each decision is an MLflow run in ``registry.experiment``.
3. **report**: the decision per scale, with the numbers compared, is the flow's result and a
   markdown artifact in the Prefect UI. When nothing upstream of ``register`` changed, there is no
   new challenger and the result says the champion stands.
4. ``dvc push`` when a remote is configured, so the next worker pulls instead of recomputing.

A failure anywhere ends the run Failed with a one-line reason; the register stage runs last, so a
failed download or training never touches the champion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State

from flows.pipeline import (
    StageError,
    dvc_command,
    failure_reason,
    medsr_pipeline,
    reproduce_stage,
    retry_policy,
    run_logged,
)


def has_dvc_remote(repo: Path) -> bool:
    """Whether a default DVC remote is configured (``dvc remote default`` prints its name)."""
    import subprocess

    from flows.pipeline import subprocess_env

    result = subprocess.run([*dvc_command(), "remote", "default"], cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0 and bool(result.stdout.strip())


@task(name="dvc-pull", task_run_name="dvc pull")
def pull_outputs(repo: str) -> bool:
    """Fetch what the remote already holds for dvc.lock; False when no remote is configured."""
    logger = get_run_logger()
    root = Path(repo)
    if not has_dvc_remote(root):
        logger.info("no DVC remote configured: skipping dvc pull (the sources are fetched by the download stage)")
        return False
    # --allow-missing: a lock entry nobody pushed yet is rebuilt by the pipeline, not an error.
    result = run_logged([*dvc_command(), "pull", "--allow-missing"], root, logger)
    if result.returncode != 0:
        raise StageError(f"dvc pull failed: {failure_reason(result.lines)}")
    return True


@task(name="dvc-push", task_run_name="dvc push")
def push_outputs(repo: str) -> bool:
    logger = get_run_logger()
    root = Path(repo)
    if not has_dvc_remote(root):
        return False
    result = run_logged([*dvc_command(), "push"], root, logger)
    if result.returncode != 0:
        raise StageError(f"dvc push failed: {failure_reason(result.lines)}")
    return True


def summarize(pipeline_result: dict[str, Any]) -> dict[str, Any]:
    """The retrain decision per scale: the register stage's record when it ran, else 'champion stands'."""
    record = pipeline_result.get("register") or {}
    decisions = record.get("decisions", {})
    if pipeline_result.get("registered_now"):
        return {"new_challenger": True, "decisions": decisions, "data_version": record.get("data_version")}
    standing = {scale: {"registered_model": d.get("registered_model"), "action": "unchanged",
                        "version": d.get("champion_after"),
                        "reason": "no stage upstream of register changed: no new challenger, the champion stands"}
                for scale, d in decisions.items()}
    return {"new_challenger": False, "decisions": standing, "data_version": record.get("data_version")}


def decision_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Retrain decision", "", "| model | action | version | champion after | reason |", "| --- | --- | --- | --- | --- |"]
    for decision in summary["decisions"].values():
        lines.append(f"| {decision.get('registered_model')} | {decision.get('action')} | {decision.get('version') or '-'} | "
                     f"{decision.get('champion_after', decision.get('version')) or '-'} | {decision.get('reason', '')} |")
    for decision in summary["decisions"].values():
        if decision.get("challenger") and decision.get("champion"):
            lines += ["", f"## {decision['registered_model']}: numbers compared ({decision.get('compared_on', '')})", "",
                      "| modality | challenger PSNR | challenger gain dB | champion PSNR | champion gain dB |",
                      "| --- | ---: | ---: | ---: | ---: |"]
            for m, s in decision["challenger"]["per_modality"].items():
                c = decision["champion"]["per_modality"].get(m, {})
                lines.append(f"| {m} | {s['psnr']:.3f} | {s['gain_db']:+.3f} | {c.get('psnr', float('nan')):.3f} | "
                             f"{c.get('gain_db', float('nan')):+.3f} |")
    return "\n".join(lines) + "\n"


@flow(name="retrain", description="Pull new data, reproduce, compare challenger with champion, promote or keep.")
def retrain(repo: str = ".") -> dict[str, Any] | State:
    """Run the retraining cycle in ``repo``; returns the decision per scale with the numbers compared."""
    from medsr.params import ParamsError, load_params

    logger = get_run_logger()
    root = Path(repo).resolve()
    try:
        params = load_params(root / "params.yaml")
        pulled = pull_outputs(str(root))
        download = reproduce_stage.with_options(**retry_policy(params, "download").task_options())
        fetched = download("download", str(root), force=True)
    except (ParamsError, StageError) as err:
        logger.error("%s", err)
        return Failed(message=str(err))
    state = medsr_pipeline(repo=str(root), return_state=True)
    if not state.is_completed():
        return Failed(message=state.message or "medsr-pipeline did not complete")
    pipeline_result = state.result()
    summary = summarize(pipeline_result)
    if not summary["decisions"]:
        logger.warning("the pipeline has no register stage: no registry decision was made")
    for decision in summary["decisions"].values():
        logger.info("%s: %s: %s", decision.get("registered_model"), decision.get("action"), decision.get("reason"))
    create_markdown_artifact(decision_markdown(summary), key="retrain-decision", description="Champion vs challenger")
    try:
        pushed = push_outputs(str(root))
    except StageError as err:
        return Failed(message=str(err))
    return {"pulled": pulled, "download": fetched, "pipeline": pipeline_result["stages"], "pushed": pushed, **summary}


def main() -> int:
    """``python -m flows.retrain [REPO]``: one retraining cycle now; prints the decisions as JSON."""
    import json
    import sys

    state = retrain(repo=sys.argv[1] if len(sys.argv) > 1 else ".", return_state=True)
    if not state.is_completed():
        print(f"retrain failed: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result()["decisions"], indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
