"""``medsr registry ...`` (review, promote, champions, register) and ``medsr schedule``.

Mounted into ``medsr.cli``'s app as ``app.add_typer(registry_app, name="registry")`` and
``app.command("schedule")(schedule_command)``; ``stages/register.py`` calls ``registry_app`` too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

registry_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Model registry (MLflow): champion and challengers of medsr-x2 / medsr-x4.")


def _console(stderr: bool = False) -> Console:
    """A console sized for the terminal at call time (COLUMNS, else the terminal, else 80)."""
    return Console(stderr=stderr)


ParamsOption = typer.Option(Path("params.yaml"), "--params", help="Parameters file.")

_T = TypeVar("_T")


@contextmanager
def _one_line_errors(command: str) -> Iterator[None]:
    """A user-facing failure becomes one line on stderr and exit code 1 (no traceback)."""
    from mlflow.exceptions import MlflowException

    from medsr.params import ParamsError
    from medsr.registry import RegistryError

    try:
        yield
    except (RegistryError, ParamsError) as err:
        _console(stderr=True).print(f"[bold red]medsr {command}:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    except MlflowException as err:
        first = str(err.message if hasattr(err, "message") else err).strip().splitlines()[0]
        _console(stderr=True).print(f"[bold red]medsr {command}:[/] MLflow refused ({err.error_code}): {first}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def _quiet_mlflow() -> None:
    # MLflow's INFO lines (database migrations, "Downloading artifacts") would bury the table.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _load(params: Path) -> dict[str, Any]:
    from medsr.params import load_params

    return load_params(params)


def _run(command: str, params: Path, action: Callable[[dict[str, Any]], _T]) -> _T:
    _quiet_mlflow()
    with _one_line_errors(command):
        return action(_load(params))


def _scores_cell(view: Any, modality: str) -> str:
    score = view.scores.per_modality.get(modality) if view.scores else None
    if score is None:
        return "-"
    return f"{score.psnr:.2f} / {score.ssim:.3f} / {score.gain_db:+.2f}"


def _signed(text: str | None) -> str:
    try:
        return f"{float(text):+.3f}" if text is not None else "-"
    except ValueError:
        return text or "-"


def print_review(reviewed: dict[str, dict[str, Any]]) -> None:
    """Champion and challengers side by side, one table per registered model."""
    for name, entry in reviewed.items():
        views = entry["versions"]
        if not views:
            _console().print(f"[bold]{name}[/]: {entry['note']}", soft_wrap=True)
            continue
        table = Table(title=f"{name}: champion vs challengers ({entry['total_versions']} version(s) registered)")
        table.add_column("")
        for view in views:
            label = f"v{view.version}" + (f" @{', @'.join(view.aliases)}" if view.aliases else "")
            table.add_column(label, justify="right")
        modalities = sorted({m for v in views if v.scores for m in v.scores.per_modality})
        rows: list[tuple[str, Callable[[Any], str]]] = [("model", lambda v: v.tags.get("model", "?"))]
        rows += [(f"{m} PSNR / SSIM / gain", lambda v, m=m: _scores_cell(v, m)) for m in modalities]
        rows += [
            ("mean test gain dB", lambda v: f"{v.scores.mean_gain_db():+.3f}" if v.scores else "-"),
            ("mean val gain dB", lambda v: _signed(v.tags.get("val.mean_gain_db"))),
            ("parameters", lambda v: f"{int(v.tags['params']):,}" if v.tags.get("params", "").isdigit() else v.tags.get("params", "-")),
            ("CPU ms (256x256)", lambda v: v.tags.get("cpu_latency_ms_256", "-")),
            ("data version", lambda v: v.tags.get("data_version", "-")[:20]),
            ("trained", lambda v: v.tags.get("trained_at", "-")),
            ("git commit", lambda v: v.tags.get("git_commit", "-")[:12]),
            ("decision", lambda v: v.tags.get("decision", "-")),
        ]
        for label, cell in rows:
            table.add_row(label, *(cell(v) for v in views))
        _console().print(table)
        if entry["note"]:
            _console().print(f"  note: {entry['note']}", highlight=False, soft_wrap=True)


def _last_selection(name: str) -> str:
    """Why the last `register` stage registered nothing for ``name``, from metrics/register.json, if it says."""
    from medsr.registry import REGISTER_METRICS

    try:
        decisions = json.loads(REGISTER_METRICS.read_text()).get("decisions", {})
    except (OSError, ValueError):
        decisions = {}
    decision = next((d for d in decisions.values() if d.get("registered_model") == name), None)
    if decision and decision.get("action") == "none":
        return f"the last `register` stage: {decision.get('selection', '')}"
    return "run `dvc repro`, or `medsr registry review`"


def print_champions(found: dict[str, Any]) -> None:
    """One line per scale: the champion and its numbers (the end of ``make run``)."""
    for name, view in found.items():
        if view is None:
            _console().print(f"{name}: no champion yet ({_last_selection(name)})", highlight=False, soft_wrap=True)
            continue
        per = ", ".join(f"{m} {s.psnr:.2f} dB ({s.gain_db:+.2f}) SSIM {s.ssim:.3f}"
                        for m, s in sorted(view.scores.per_modality.items())) if view.scores else "no numbers recorded"
        mean = f"{view.scores.mean_gain_db():+.3f} dB" if view.scores else "?"
        _console().print(f"{name} champion: v{view.version} {view.tags.get('model', '?')}, mean test gain over bicubic {mean}; "
                      f"{per}; data {view.tags.get('data_version', '?')[:16]}", highlight=False, soft_wrap=True)


@registry_app.command()
def review(params: Path = ParamsOption,
           limit: int = typer.Option(3, "--limit", help="How many versions besides the champion to show."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
           evaluate: Path | None = typer.Option(None, "--evaluate", help="Also score every version shown on this folder "
                                                "of your own HR images (as `medsr evaluate`), before a promotion."),
           modality: str | None = typer.Option(None, "--modality", help="With --evaluate: xray, ct or mri.")) -> None:
    """Champion vs challengers per scale: per-modality PSNR/SSIM and gain over bicubic, cost, data version, when trained."""
    from medsr.registry import as_jsonable, review as review_registry

    def act(p: dict[str, Any]) -> dict[str, Any]:
        reviewed = review_registry(p, limit=limit)
        if evaluate is not None:
            from medsr.evaluation import evaluate_folder, load_folder
            from medsr.tracking import load_logged_generator

            loaded: dict[int, Any] = {}  # the folder, read and degraded once per scale
            for name, entry in reviewed.items():
                entry["evaluated"] = {}
                for view in entry["versions"]:
                    uri = f"models:/{name}/{view.version}"
                    generator, spec = load_logged_generator(uri)
                    scale = int(spec["scale"])
                    if scale not in loaded:
                        loaded[scale] = load_folder(evaluate, scale, p, modality=modality)
                    entry["evaluated"][view.version] = evaluate_folder(evaluate, generator, scale, p, label=uri,
                                                                       loaded=loaded[scale])
        return reviewed

    reviewed = _run("registry review", params, act)
    if as_json:
        print(json.dumps(as_jsonable(reviewed), indent=2, sort_keys=True))
        return
    print_review(reviewed)
    if evaluate is not None:
        from medsr.reporting import evaluation_tables

        for entry in reviewed.values():
            for report in entry.get("evaluated", {}).values():
                for table in evaluation_tables(report):
                    _console().print(table)


@registry_app.command()
def promote(version: str = typer.Argument(..., help="Version number, or NAME/VERSION (e.g. medsr-x4/3)."),
            scale: int = typer.Option(None, "--scale", help="Which registered model (2 -> medsr-x2); not needed with NAME/VERSION."),
            force: bool = typer.Option(False, "--force", help="Promote even if worse than the champion (needs --reason)."),
            reason: str = typer.Option(None, "--reason", help="Why; recorded as a tag with who promoted."),
            params: Path = ParamsOption) -> None:
    """Make VERSION the champion; a model worse than the champion is refused unless --force --reason."""
    from medsr.registry import RegistryError, RegistrySettings, promote as promote_version

    def act(p: dict[str, Any]) -> dict[str, Any]:
        settings = RegistrySettings.from_params(p)
        if "/" in version:
            name, number = version.rsplit("/", 1)
        elif scale is not None:
            name, number = settings.name_for(scale), version
        else:
            raise RegistryError("say which model: `promote VERSION --scale 2` or `promote medsr-x2/VERSION`")
        if not number.isdigit():
            raise RegistryError(f"version {number!r} is not a number")
        return promote_version(p, name, number, force=force, reason=reason)

    decision = _run("registry promote", params, act)
    _console().print(decision["reason"], highlight=False, soft_wrap=True)


@registry_app.command()
def champions(params: Path = ParamsOption) -> None:
    """The champion of each scale and its test numbers."""
    from medsr.registry import champions as find_champions

    print_champions(_run("registry champions", params, find_champions))


@registry_app.command()
def register(params: Path = ParamsOption) -> None:
    """The `register` DVC stage: register the best model per scale and move the aliases."""
    from medsr.registry import register_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = _run("register", params, register_stage)
    for decision in record["decisions"].values():
        _console().print(f"{decision['registered_model']}: {decision['action']}: {decision['reason']}", highlight=False, soft_wrap=True)


def schedule_command(cron: str = typer.Option(None, "--cron", help='Cron string, e.g. "0 3 * * 0" (default: flows.schedule.cron).'),
                     timezone: str = typer.Option(None, "--timezone", help="IANA time zone of the cron (default: flows.schedule.timezone)."),
                     name: str = typer.Option(None, "--name", help="Deployment name (default: flows.schedule.deployment)."),
                     port: int = typer.Option(4200, "--port", help="Port of the local Prefect server started when PREFECT_API_URL is unset."),
                     params: Path = ParamsOption) -> None:
    """Serve the `retrain` flow as a Prefect deployment on a cron schedule (runs until stopped).

    Uses PREFECT_API_URL, else a Prefect server on 127.0.0.1:PORT (started if none answers; its UI
    shows the runs)."""
    from medsr.params import ParamsError

    repo = Path.cwd()
    if not (repo / "flows" / "retrain.py").is_file():
        _console(stderr=True).print("[bold red]medsr schedule:[/] run it from the repository root (flows/retrain.py not found here)")
        raise typer.Exit(1)
    from flows.deploy import ScheduleError, serve_retrain

    try:
        serve_retrain(repo=repo, cron=cron, timezone=timezone, name=name, params_path=params, port=port)
    except (ScheduleError, ParamsError) as err:
        _console(stderr=True).print(f"[bold red]medsr schedule:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    registry_app()
