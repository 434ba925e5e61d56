"""The ``medsr`` command line: every pipeline stage, plus the summary ``make run`` prints."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedSR: reproducible medical image super-resolution.")
console = Console()
err_console = Console(stderr=True)

ParamsOption = typer.Option(Path("params.yaml"), "--params", help="Parameters file.")


def run_stage(name: str, func: Callable[[dict[str, Any]], dict[str, Any]], params_path: Path) -> dict[str, Any]:
    """Run one stage; a user-facing failure becomes one line on stderr and exit code 1."""
    from medsr.data.sources.errors import SourceError
    from medsr.params import ParamsError, load_params
    from medsr.stage_entry import StageFailed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internals
    try:
        return func(load_params(params_path))
    except (SourceError, ParamsError, StageFailed) as err:
        err_console.print(f"[bold red]medsr {name}:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


@app.command()
def download(params: Path = ParamsOption) -> None:
    """Fetch each modality's source (sample, kaggle, local) into data/raw and tabulate it."""
    from medsr.pipeline import download_stage

    summary = run_stage("download", download_stage, params)
    console.print(f"download: {summary['images']} images from {summary['files']} files "
                  f"({summary['load_errors']} could not be loaded)")


@app.command()
def validate(params: Path = ParamsOption) -> None:
    """Run the Great Expectations suite and pixel checks; quarantine failures."""
    from medsr.pipeline import validate_stage

    summary = run_stage("validate", validate_stage, params)
    console.print(f"validate: {summary['passed']} passed, {summary['quarantined']} quarantined")


@app.command()
def split(params: Path = ParamsOption) -> None:
    """Split train/val/test by patient (or by region where a modality has too few patients)."""
    from medsr.pipeline import split_stage

    run_stage("split", split_stage, params)
    console.print("split: written data/split")


@app.command()
def degrade(params: Path = ParamsOption) -> None:
    """Generate the LR/HR (and VLR/LR) pair sets for every split and scale."""
    from medsr.pipeline import degrade_stage

    summary = run_stage("degrade", degrade_stage, params)
    console.print(f"degrade: {summary['total_pairs']} pairs written")


def trained_model_choices(incomplete: str = "") -> list[str]:
    """The names ``medsr train`` accepts (every trained model in the architecture registry) that
    start with ``incomplete``: the shell completion of its MODEL argument. Imported lazily: the
    registry imports torch, which every other command would otherwise pay for at start-up."""
    from medsr.models import model_names

    return [name for name in model_names(trained=True) if name.startswith(incomplete)]


@app.command("enable-pretrained")
def enable_pretrained(model: str = typer.Argument("rlfn", help="The commented-out train.models entry to switch on."),
                      params: Path = ParamsOption) -> None:
    """Switch on the commented-out entry that fine-tunes a model from published weights (params.yaml)."""
    from medsr.atomic import write_text
    from medsr.pretrained import enable_commented_entry

    text = params.read_text()
    try:
        enabled = enable_commented_entry(text, model)
    except ValueError as err:
        err_console.print(f"[bold red]medsr enable-pretrained:[/] {params}: {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    if enabled == text:
        console.print(f"{params}: train.models.{model} is already on")
        return
    write_text(params, enabled)
    console.print(f"{params}: train.models.{model} switched on; `dvc repro` now fetches its checkpoints into "
                  "pretrained/ (or uses the files placed there), fine-tunes and benchmarks it")


@app.command("models")
def list_models() -> None:
    """List the registered architectures: name, whether it is trained and adversarial, description."""
    from medsr.models import ARCHITECTURES

    table = Table(title="Registered architectures (medsr/models/; `medsr train` takes the trained ones)")
    for column in ("name", "trained", "adversarial", "pairs", "loss", "description"):
        table.add_column(column)
    for spec in ARCHITECTURES:
        table.add_row(spec.name, "yes" if spec.trained else "no (baseline)", "yes" if spec.adversarial else "no",
                      spec.training_pairs, spec.loss_recipe, spec.description)
    console.print(table)


@app.command()
def train(model: str = typer.Argument(..., autocompletion=trained_model_choices,
                                      help="A trained model's name; `medsr models` lists them."),
          params: Path = ParamsOption,
          profile: str = typer.Option(None, "--profile", help="Override train.profile (sample, full, ...)."),
          device: str = typer.Option(None, "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
          nproc: int = typer.Option(None, "--nproc", min=1,
                                    help="Data-parallel ranks through torchrun (overrides train.nproc; "
                                         "NCCL on CUDA, gloo on CPU).")) -> None:
    """Train one model at every scale; logged to MLflow; resumes a killed run from its checkpoint."""
    from medsr.training.stage import train_stage

    def run(p: dict[str, Any]) -> dict[str, Any]:
        if device:
            p.setdefault("train", {})["device"] = device
        if nproc:
            p.setdefault("train", {})["nproc"] = nproc
        return train_stage(p, model, profile=profile)

    summary = run_stage("train", run, params)
    for scale, result in summary["scales"].items():
        console.print(f"train {model} {scale}: best val PSNR {result['best_val_psnr']:.2f} dB at step "
                      f"{result['best_step']} of {result['steps_done']} ({result['seconds']:.0f} s)")


@app.command()
def benchmark(params: Path = ParamsOption) -> None:
    """Score every trained model and bicubic on the test split (metrics/benchmark.json, plots/)."""
    from medsr.benchmark import benchmark_stage

    run_stage("benchmark", benchmark_stage, params)
    print_results()


def print_results() -> None:
    """Per scale and track: each model's test gain over bicubic with the consistency step and alone, with n;
    then what each network learned on validation."""
    from medsr.reporting import learning_checks, learning_table, results_tables, sizes_table

    report = _read_metrics("benchmark")
    if not report:
        return
    checks = learning_checks(report)
    for result in [*results_tables(report, "test"), learning_table(checks), sizes_table(checks)]:
        console.print(result.to_rich())
    console.print("Every table as markdown, test and validation: `medsr report` (writes docs/results.md)")


@app.command()
def report(out: Path = typer.Option(Path("docs/results.md"), "--out", help="Markdown file to write."),
           readme: Path = typer.Option(Path("README.md"), "--readme",
                                       help="README whose results block is rewritten (the lines between its markers).")) -> None:
    """Write the results tables (test and validation, both numbers per model) from metrics/benchmark.json,
    and the per-model summary into the README's results block."""
    from medsr.atomic import atomic_path
    from medsr.reporting import results_document, with_readme_results

    benchmark_report = _read_metrics("benchmark")
    if not benchmark_report:
        err_console.print("medsr report: metrics/benchmark.json is missing: run `dvc repro` (or `make run`) first")
        raise typer.Exit(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        updated = with_readme_results(readme.read_text(), benchmark_report) if readme.is_file() else None
    except ValueError as err:
        err_console.print(f"medsr report: {readme}: {err}")
        raise typer.Exit(1) from None
    with atomic_path(out, suffix=".md") as tmp:
        tmp.write_text(results_document(benchmark_report))
    console.print(f"report: written {out}")
    if updated is not None:
        with atomic_path(readme, suffix=".md") as tmp:
            tmp.write_text(updated)
        console.print(f"report: results block of {readme} updated")


@app.command()
def package(
    alias: str = typer.Option(None, help="Registry alias to package (default: serving.alias in params.yaml)."),
    bentofile: str = typer.Option("bentofile.yaml", help="BentoML build file, relative to the repository root."),
) -> None:
    """Build a Bento of the serving service carrying the registry's champion generators."""
    from medsr.tracking import ModelNotFoundError
    from serving.packaging import package_bento

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        bento_tag, models = package_bento(Path("."), bentofile, alias=alias)
    except ModelNotFoundError as err:
        err_console.print(f"[bold red]medsr package:[/] {err}. Fix: run `make run` (it trains and registers a champion) "
                          "or point MLFLOW_TRACKING_URI at a registry that has one", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    for scale, tag in sorted(models.items(), reverse=True):
        console.print(f"package: x{scale} champion imported as BentoML model {tag}")
    console.print(f"package: built Bento {bento_tag}; serve it with `bentoml serve {bento_tag} --host 127.0.0.1 --port 3000`")


@app.command()
def evaluate(
    folder: Path = typer.Argument(..., help="A folder of your own HR images: DICOM, NIfTI, PNG or TIFF (searched recursively)."),
    model: str = typer.Option("models:/medsr-x4@champion", "--model",
                              help="models:/NAME@ALIAS, models:/NAME/VERSION, a registry version number, or a .pt checkpoint."),
    scale: int = typer.Option(4, "--scale", help="2 or 4; must match the model."),
    modality: str | None = typer.Option(None, "--modality", help="xray, ct or mri (default: folder name or DICOM tag)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write every number to this JSON file."),
    consistency: bool = typer.Option(True, "--consistency/--no-consistency",
                                     help="Apply params.yaml's consistency step to the model's output (as served)."),
    params: Path = ParamsOption,
) -> None:
    """Model vs bicubic on your own images: PSNR/SSIM per image and on average, on the clean and realistic tracks."""
    from medsr.atomic import write_json
    from medsr.evaluation import evaluate_folder, load_upscaler
    from medsr.params import ParamsError, load_params
    from medsr.registry import RegistrySettings

    def fail(message: str) -> None:
        err_console.print(f"[bold red]medsr evaluate:[/] {message}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)

    try:
        p = load_params(params)
        generator, label = load_upscaler(model, scale, registry_names=RegistrySettings.from_params(p).model_names)
        report = evaluate_folder(folder, generator, scale, p, label=label, modality=modality, consistency=consistency)
    except (ValueError, ParamsError, FileNotFoundError) as err:
        fail(str(err))
    except Exception as err:  # e.g. an unreachable registry: one line, not a traceback
        fail(f"cannot load {model}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    for line in report["skipped"]:
        err_console.print(f"skipped {line}", soft_wrap=True, highlight=False)
    from medsr.reporting import evaluation_tables

    for table in evaluation_tables(report):
        console.print(table)
    if json_out is not None:
        write_json(json_out, report)
        console.print(f"evaluate: written {json_out}")


def _read_metrics(name: str) -> dict[str, Any]:
    path = Path("metrics") / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@app.command()
def summary() -> None:
    """Print what the last pipeline run produced (read from metrics/)."""
    from medsr.data import MODALITIES

    download_m, validation, split_m, degrade_m = (_read_metrics(n) for n in ("download", "validation", "split", "degrade"))
    if not download_m:
        err_console.print("no pipeline output yet: run `dvc repro` (or `make run`) first")
        raise typer.Exit(1)
    table = Table(title="MedSR data: images per modality and split")
    for column in ("modality", "source", "loaded", "passed", "train", "val", "test", "gap", "split by"):
        table.add_column(column, justify="right" if column not in ("modality", "source", "split by") else "left")
    for m in MODALITIES:
        per_split = split_m.get("images", {}).get(m, {})
        table.add_row(m, str(download_m.get("sources", {}).get(m, "-")), str(download_m["images_per_modality"].get(m, 0)),
                      str(validation.get("passed_per_modality", {}).get(m, 0)),
                      *(str(per_split.get(s, 0)) for s in ("train", "val", "test", "gap")),
                      ", ".join(split_m.get("method", {}).get(m, [])))
    console.print(table)
    files = split_m.get("files", {})
    if files:
        files_table = Table(title="Source files per split (a file is in one split, or cut by region with a gap)")
        for column in ("modality", "train", "val", "test", "gap (unused)"):
            files_table.add_column(column)
        for m in MODALITIES:
            files_table.add_row(m, *("\n".join(files.get(m, {}).get(s, [])) or "-" for s in ("train", "val", "test", "gap")))
        console.print(files_table)
    pairs = degrade_m.get("pairs", {})
    if pairs:
        pairs_table = Table(title=f"Pairs written: {degrade_m.get('total_pairs', 0)}")
        pairs_table.add_column("split")
        scale_kinds = sorted({(sc, k) for s in pairs.values() for sc, kinds in s.items() for k in kinds})
        for sc, k in scale_kinds:
            pairs_table.add_column(f"{sc} {k}", justify="right")
        for split_name, scales in pairs.items():
            pairs_table.add_row(split_name, *(str(scales.get(sc, {}).get(k, 0)) for sc, k in scale_kinds))
        console.print(pairs_table)
    quarantine = Path("data/validated/quarantine.csv")
    if quarantine.is_file():
        import pandas as pd

        q = pd.read_csv(quarantine)
        console.print(f"Quarantined: {q['id'].nunique()} image(s)" + (":" if len(q) else "."))
        for row in q.drop_duplicates("id").itertuples():
            console.print(f"  [{row.modality}] {row.reason}", highlight=False, soft_wrap=True)
    print_results()


def _mount_orchestration() -> None:
    from medsr.registry_cli import registry_app, schedule_command

    app.add_typer(registry_app, name="registry")
    app.command("schedule")(schedule_command)


_mount_orchestration()

if __name__ == "__main__":
    app()
