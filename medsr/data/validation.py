"""Validation: a Great Expectations suite over the metadata table plus pixel checks GE cannot express.

Rows that fail are quarantined with a reason naming the file; the rest go on. Nothing is deleted:
the raw file stays where it is and the quarantine list says why it was held back.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsr.data import MODALITIES, ContractError, check_contract
from medsr.data.shards import decode, read_stored, tile_digest

# Below this standard deviation (on the [0, 1] scale) an image carries no structure to learn from.
MIN_STD = 1e-3


@dataclass
class ValidationResult:
    passed: pd.DataFrame
    quarantine: pd.DataFrame  # id, path, modality, check, reason
    expectations: list[dict[str, Any]]
    total: int
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def quarantined_images(self) -> int:
        """Images held back: one image failing several checks has one row per check, and counts once."""
        return int(self.quarantine["id"].nunique()) if len(self.quarantine) else 0

    @property
    def quarantined_fraction(self) -> float:
        return self.quarantined_images / self.total if self.total else 0.0


def build_suite(min_size: int) -> Any:
    """The expectations every table row must meet (GE 1.x objects, imported lazily: GE takes 4 s to import)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="medsr_images")
    for expectation in (
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="patient_key"),
        gxe.ExpectColumnValuesToNotBeNull(column="sha256"),
        gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=list(MODALITIES)),
        gxe.ExpectColumnValuesToBeInTypeList(column="height", type_list=["int64", "int32", "Int64"]),
        gxe.ExpectColumnValuesToBeInTypeList(column="width", type_list=["int64", "int32", "Int64"]),
        gxe.ExpectColumnValuesToBeInTypeList(column="min", type_list=["float64", "float32"]),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=min_size),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=min_size),
        # Finite and in the contract range: NaN and inf fall outside any between-range.
        gxe.ExpectColumnValuesToBeBetween(column="min", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="max", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=MIN_STD, strict_min=True),
    ):
        suite.add_expectation(expectation)
    return suite


def run_suite(table: pd.DataFrame, min_size: int) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """Validate the table with GE; return per-expectation results and failing row numbers -> reasons."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas("medsr").add_dataframe_asset("images")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": table.assign(row=np.arange(len(table)))})
    result = batch.validate(build_suite(min_size),
                            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]})
    expectations: list[dict[str, Any]] = []
    failures: dict[int, list[str]] = {}
    for item in result.results:
        config = item.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        column = kwargs.get("column", "")
        summary = {"expectation": config.type, "kwargs": kwargs, "success": bool(item.success),
                   "unexpected_count": int(item.result.get("unexpected_count") or 0),
                   "element_count": int(item.result.get("element_count") or len(table))}
        expectations.append(summary)
        for entry in item.result.get("unexpected_index_list") or []:
            value = entry.get(column)
            failures.setdefault(int(entry["row"]), []).append(f"{config.type}({column}) failed with value {value!r}")
    return expectations, failures


def pixel_problems(row: Mapping[str, Any], interim_dir: Path) -> list[str]:
    """Checks on the stored array itself: readable, contract-shaped, unchanged since ingest, not constant."""
    try:
        stored = read_stored(interim_dir, row)
        pixels = decode(stored)
    except (OSError, ValueError, TypeError) as err:
        return [f"stored array unreadable ({err.__class__.__name__})"]
    problems = []
    try:
        check_contract(pixels, str(row["path"]))
    except ContractError as err:
        problems.append(f"array contract violated: {err}")
        return problems
    if tile_digest(stored) != row["sha256"]:
        problems.append("pixels changed since ingest (sha256 mismatch)")
    if pixels.shape[1:] != (row["height"], row["width"]):
        problems.append(f"stored shape {pixels.shape[1:]} differs from the table ({row['height']}x{row['width']})")
    if float(pixels.std()) <= MIN_STD:
        problems.append("constant image: no structure to super-resolve")
    return problems


def validate_table(table: pd.DataFrame, interim_dir: Path, *, min_size: int) -> ValidationResult:
    """Quarantine load errors, GE failures, pixel problems and exact duplicates; keep the rest."""
    reasons: dict[int, list[tuple[str, str]]] = {}

    def flag(row_number: int, check: str, reasons_: Iterable[str]) -> None:
        for reason in reasons_:
            reasons.setdefault(row_number, []).append((check, reason))

    loaded = table["error"].isna().to_numpy()
    for i in np.flatnonzero(~loaded):
        flag(int(i), "load", [str(table["error"].iat[i])])
    good_rows = np.flatnonzero(loaded)
    expectations: list[dict[str, Any]] = []
    if len(good_rows):
        loaded_table = table.iloc[good_rows].reset_index(drop=True)
        expectations, failures = run_suite(loaded_table, min_size)
        for local_row, failed in failures.items():
            flag(int(good_rows[local_row]), "expectation", failed)
        # Duplicates are judged within a modality: the same pixels filed under X-ray and CT are
        # two cases of the user's folders, and dropping the CT copy emptied the CT test split.
        seen: dict[tuple[str, str], str] = {}
        for i in good_rows:
            row = table.iloc[i]
            flag(int(i), "pixels", pixel_problems(row, interim_dir))
            key = (str(row["modality"]), str(row["sha256"]))
            if key in seen:
                flag(int(i), "duplicate", [f"same pixels as {seen[key]}"])
            else:
                seen[key] = row["id"]
    records = []
    for i, items in sorted(reasons.items()):
        row = table.iloc[i]
        for check, reason in items:
            text = reason if str(reason).startswith(str(row["path"])) else f"{row['path']}: {reason}"
            records.append({"id": row["id"], "path": row["path"], "modality": row["modality"], "check": check, "reason": text})
    quarantine = pd.DataFrame(records, columns=["id", "path", "modality", "check", "reason"])
    passed = table.drop(index=table.index[sorted(reasons)]).reset_index(drop=True)
    result = ValidationResult(passed=passed, quarantine=quarantine, expectations=expectations, total=len(table))
    result.summary = summarise(result)
    return result


def summarise(result: ValidationResult) -> dict[str, Any]:
    quarantined_ids = result.quarantine.drop_duplicates("id")
    return {
        "images": result.total,
        "passed": len(result.passed),
        "quarantined": len(quarantined_ids),
        "quarantined_fraction": round(len(quarantined_ids) / result.total, 4) if result.total else 0.0,
        "passed_per_modality": {m: int((result.passed["modality"] == m).sum()) for m in MODALITIES},
        "quarantined_per_check": dict(Counter(result.quarantine.drop_duplicates("id")["check"])),
        "expectations_passed": sum(e["success"] for e in result.expectations),
        "expectations_total": len(result.expectations),
    }


def render_report(result: ValidationResult, max_fraction: float) -> str:
    """A self-contained HTML page of the suite's results and the quarantine list."""
    s = result.summary
    verdict = "PASSED" if result.quarantined_fraction <= max_fraction else "FAILED"
    exp_rows = "".join(
        f"<tr class={'ok' if e['success'] else 'bad'}><td>{html.escape(e['expectation'])}</td>"
        f"<td><code>{html.escape(str(e['kwargs']))}</code></td><td>{'yes' if e['success'] else 'no'}</td>"
        f"<td>{e['unexpected_count']} / {e['element_count']}</td></tr>" for e in result.expectations)
    q_rows = "".join(
        f"<tr><td>{html.escape(str(r.modality))}</td><td>{html.escape(str(r.check))}</td><td>{html.escape(str(r.reason))}</td></tr>"
        for r in result.quarantine.itertuples())
    per_mod = ", ".join(f"{m}: {n}" for m, n in s["passed_per_modality"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>MedSR data validation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.bad{{background:#fdd}}tr.ok{{background:#efe}}</style></head><body>
<h1>MedSR data validation: {verdict}</h1>
<p>{s['images']} images, {s['passed']} passed, {s['quarantined']} quarantined
({100 * s['quarantined_fraction']:.1f}%, limit {100 * max_fraction:.0f}%). Passed per modality: {per_mod}.</p>
<h2>Great Expectations suite <code>medsr_images</code>: {s['expectations_passed']}/{s['expectations_total']} expectations met</h2>
<table><tr><th>expectation</th><th>arguments</th><th>met</th><th>unexpected</th></tr>{exp_rows}</table>
<h2>Quarantine</h2><table><tr><th>modality</th><th>check</th><th>reason</th></tr>{q_rows}</table>
</body></html>
"""
