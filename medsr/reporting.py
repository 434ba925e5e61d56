"""Results tables from ``metrics/benchmark.json``: one layout for the terminal and for markdown.

Each table is one scale and one track of one split, so it stays readable at 80 columns. A cell
is ``system/network``: the gain over bicubic in PSNR dB of the model with the consistency step
(what is served) and of the network alone. ``bicubic`` shows its PSNR; ``bicubic+consistency``
(the free baseline) shows its gain, so what a model adds is its system gain minus that row's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

BASELINE_ROWS = ("bicubic", "bicubic+consistency")


@dataclass(frozen=True)
class ResultsTable:
    """One scale and track of one split: a title, column names and rows of strings."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def to_rich(self) -> Table:
        """The table as ``medsr summary`` prints it: names left, numbers right."""
        table = Table(title=self.title)
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    modalities = sorted({r["modality"] for r in rows if r["modality"] != "all"})
    return [*modalities, "all"] if any(r["modality"] == "all" for r in rows) else modalities


def _value(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["model"] == "bicubic":
        return f"{row['psnr']:.2f} dB"
    if row["model"] == "bicubic+consistency":
        return f"{row['gain_db']:+.2f}"
    network = row.get("network_gain_db")
    return f"{row['gain_db']:+.2f}/" + ("-" if network is None else f"{network:+.2f}")


def results_tables(report: Mapping[str, Any], split: str = "test") -> list[ResultsTable]:
    """Tables of ``report``'s ``results`` (split ``test``) or ``validation`` rows, per scale and track
    (each model's size is in :func:`sizes_table`, so a row fits an 80-column log)."""
    rows = report.get("results" if split == "test" else "validation", [])
    tables = []
    for scale in sorted({int(r["scale"]) for r in rows}):
        for track in dict.fromkeys(r["track"] for r in rows if int(r["scale"]) == scale):
            chosen = [r for r in rows if int(r["scale"]) == scale and r["track"] == track]
            cells = _cells(chosen)
            by_key = {(r["model"], r["modality"]): r for r in chosen}
            n = [next((f"{r['images']}/{r['files']}" for r in chosen if r["modality"] == c), "-") for c in cells]
            body = [["n", *n]]
            for model in dict.fromkeys(r["model"] for r in chosen):
                body.append([model, *(_value(by_key.get((model, c))) for c in cells)])
            tables.append(ResultsTable(
                title=f"{split}, x{scale}, {track} track: gain over bicubic in dB, with consistency step/network alone "
                      "(n = images/files)",
                columns=["model", *cells], rows=body))
    return tables


def markdown(tables: Sequence[ResultsTable]) -> str:
    """The tables as GitHub markdown, each under its title."""
    parts = []
    for table in tables:
        lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |",
                 "| --- |" + " ---: |" * (len(table.columns) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class LearningCheck:
    """Did one (model, scale) learn, and does it beat the free baseline? Validation split only.

    ``network_mean_db``: the network alone, mean gain over bicubic over the modalities of both
    tracks; ``system_mean_db`` / ``baseline_mean_db``: per track, the mean gain over the
    modalities with the consistency step, for the model and for ``bicubic+consistency``.
    """

    model: str
    scale: int
    params: int | None
    size: str
    network_mean_db: float
    system_mean_db: dict[str, float]
    baseline_mean_db: dict[str, float]

    @property
    def learned(self) -> bool:
        return self.network_mean_db > 0

    @property
    def beats_baseline(self) -> bool:
        return all(self.system_mean_db[t] > self.baseline_mean_db[t] for t in self.system_mean_db)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _size(options: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((options or {}).items())) or "defaults"


def learning_checks(report: Mapping[str, Any]) -> list[LearningCheck]:
    """One :class:`LearningCheck` per trained model and scale of ``report`` (benchmark.json)."""
    rows = [r for r in report.get("validation", []) if r["modality"] != "all"]
    checks = []
    for scale in sorted({int(r["scale"]) for r in rows}):
        at_scale = [r for r in rows if int(r["scale"]) == scale]
        tracks = list(dict.fromkeys(r["track"] for r in at_scale))

        def means(model: str, key: str, chosen: Sequence[str]) -> list[float]:
            return [r[key] for r in at_scale if r["model"] == model and r["track"] in chosen]

        for model in dict.fromkeys(r["model"] for r in at_scale if r["model"] not in BASELINE_ROWS):
            details = (report.get("models") or {}).get(model, {}).get(f"x{scale}", {})
            # Mean over the modalities of the tracks, each cell weighing the same (as the registry's mean).
            checks.append(LearningCheck(
                model=model, scale=scale, params=details.get("params"), size=_size(details.get("model_options")),
                network_mean_db=_mean(means(model, "network_gain_db", tracks)),
                system_mean_db={t: _mean(means(model, "gain_db", [t])) for t in tracks},
                baseline_mean_db={t: _mean(means("bicubic+consistency", "gain_db", [t])) for t in tracks}))
    return checks


def _params(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def _gain_cells(check: LearningCheck, tracks: Sequence[str], separator: str) -> list[str]:
    """The network's own mean gain, then per track ``system<separator>baseline`` (both tables' cells)."""
    return [f"{check.network_mean_db:+.2f}",
            *(f"{check.system_mean_db[t]:+.2f}{separator}{check.baseline_mean_db[t]:+.2f}" for t in tracks)]


def learning_table(checks: Sequence[LearningCheck]) -> ResultsTable:
    """The checks as one narrow table: the network's own mean gain, then per track the system's mean
    and the baseline's (``system/baseline``), and the two verdicts (sizes: :func:`sizes_table`)."""
    tracks = list(checks[0].system_mean_db) if checks else []
    rows = [[f"{c.model} x{c.scale}", *_gain_cells(c, tracks, "/"),
             "yes" if c.learned else "no", "yes" if c.beats_baseline else "no"] for c in checks]
    return ResultsTable(
        title="validation, mean over modalities (dB): network alone; per track, system/bicubic+consistency",
        columns=["model", "alone", *tracks, "learned", "beats b+c"], rows=rows)


def sizes_table(checks: Sequence[LearningCheck]) -> ResultsTable:
    """What size of each architecture was trained (model options over the architecture's defaults)."""
    return ResultsTable(title="size trained", columns=["model", "model options", "params"],
                        rows=[[f"{c.model} x{c.scale}", c.size, _params(c.params)] for c in checks])


def results_document(report: Mapping[str, Any]) -> str:
    """``docs/results.md``: the learning check, then the test and validation tables (markdown)."""
    head = ("# Results\n\nGenerated by `medsr report` from `metrics/benchmark.json` (the last `dvc repro`). "
            "Gains are over bicubic in PSNR dB; a model cell is `with consistency step / network alone`; "
            "`bicubic+consistency` is bicubic followed by the same step, which any image gets for free: what a "
            "model adds is its gain minus that row's. n = images / source files. Models are selected on "
            "validation; test is reported once.\n\n")
    checks = learning_checks(report)
    return (head + markdown([learning_table(checks), sizes_table(checks)]) + "\n## Test split\n\n"
            + markdown(results_tables(report, "test")) + "\n## Validation split\n\n"
            + markdown(results_tables(report, "val")))


README_BEGIN = "<!-- results: written by `medsr report`; edits between these lines are replaced -->"
README_END = "<!-- /results -->"


def readme_table(checks: Sequence[LearningCheck]) -> ResultsTable:
    """Per model and scale: the size the profile trained, the network's own validation mean gain and,
    per track, the system's mean beside ``bicubic+consistency``'s: the README's results table."""
    tracks = list(checks[0].system_mean_db) if checks else []
    rows = [[f"{c.model} x{c.scale}", c.size, _params(c.params), *_gain_cells(c, tracks, " / "),
             "yes" if c.learned and c.beats_baseline else "no"] for c in checks]
    return ResultsTable(
        title="validation, mean gain over bicubic across modalities (dB): the network alone; per track, "
              "with the consistency step / bicubic+consistency",
        columns=["model", "size trained", "params", "alone", *(f"{t}: system / b+c" for t in tracks), "earns its row"],
        rows=rows)


def with_readme_results(readme: str, report: Mapping[str, Any]) -> str:
    """``readme`` with the text between :data:`README_BEGIN` and :data:`README_END` replaced by
    :func:`readme_table` of ``report``.

    Raises ValueError when the markers are missing or out of order (the README was edited by hand:
    the fix is to put both lines back where the table belongs).
    """
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no results block: the README needs the lines {README_BEGIN!r} and {README_END!r}, "
                         "in that order, where the table goes")
    table = markdown([readme_table(learning_checks(report))])
    return readme[:start + len(README_BEGIN)] + "\n" + table + readme[end:]


def evaluation_tables(report: Mapping[str, Any]) -> list[Table]:
    """The per-image table and the per-track, per-modality means of a
    :func:`medsr.evaluation.evaluate_folder` report (``medsr evaluate``, ``medsr registry review``)."""
    tracks = report["tracks"]
    per_image = report["per_image"]
    table = Table(title=f"{report['model']} x{report['scale']} vs bicubic, per image: PSNR dB / SSIM")
    for column in ("image", "modality", *[f"{t} model" for t in tracks], *[f"{t} bicubic" for t in tracks], "gain dB"):
        table.add_column(column, justify="left" if column in ("image", "modality") else "right")
    for key in dict.fromkeys(r["image"] for r in per_image):
        cells = {r["track"]: r for r in per_image if r["image"] == key}
        first = next(iter(cells.values()))
        table.add_row(key, first["modality"], *[f"{cells[t]['psnr']:.2f} / {cells[t]['ssim']:.3f}" for t in tracks],
                      *[f"{cells[t]['bicubic_psnr']:.2f} / {cells[t]['bicubic_ssim']:.3f}" for t in tracks],
                      " ".join(f"{cells[t]['gain_db']:+.2f}" for t in tracks))
    summary_table = Table(title="Mean per track and modality (n = images / files)")
    for column in ("track", "modality", "n", "PSNR", "bicubic", "gain dB", "SSIM gain"):
        summary_table.add_column(column, justify="left" if column in ("track", "modality") else "right")
    for r in report["summary"]:
        summary_table.add_row(r["track"], r["modality"], f"{r['images']} / {r['files']}", f"{r['psnr']:.2f}",
                              f"{r['bicubic_psnr']:.2f}", f"{r['gain_db']:+.3f}", f"{r['ssim_gain']:+.4f}")
    return [table, summary_table]
