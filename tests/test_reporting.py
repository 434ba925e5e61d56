"""Results tables: both numbers per model (with the consistency step and the network alone), the free
baseline beside them, a learning check that a consistency-only gain cannot pass, and tables a log can show."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from medsr.reporting import learning_checks, learning_table, markdown, results_document, results_tables, sizes_table

CELLS = [("clean", "mri"), ("clean", "xray"), ("realistic", "mri"), ("realistic", "xray")]
STEP = {("clean", "mri"): 0.4, ("clean", "xray"): 0.4, ("realistic", "mri"): 0.0, ("realistic", "xray"): 0.0}


def _rows(model: str, system: dict[tuple[str, str], float], network: dict[tuple[str, str], float],
          split: str = "val", scale: int = 4) -> list[dict[str, Any]]:
    rows = []
    # Test has CT too (one file); validation has none, as on the embedded sample.
    cells = [*CELLS, ("clean", "ct"), ("realistic", "ct")] if split == "test" else CELLS
    system = {**system, ("clean", "ct"): system[("clean", "mri")], ("realistic", "ct"): system[("realistic", "mri")]}
    network = {**network, ("clean", "ct"): network[("clean", "mri")], ("realistic", "ct"): network[("realistic", "mri")]}
    for track, modality in cells:
        rows.append({"model": model, "split": split, "scale": scale, "track": track, "modality": modality,
                     "images": 6, "files": 1, "psnr": 30.0 + system[(track, modality)], "gain_db": system[(track, modality)],
                     "network_gain_db": network[(track, modality)], "ssim_gain": 0.0})
    for track in ("clean", "realistic"):
        chosen = [c for c in cells if c[0] == track]
        rows.append({"model": model, "split": split, "scale": scale, "track": track, "modality": "all", "images": 12,
                     "files": 2, "psnr": 30.0, "gain_db": sum(system[c] for c in chosen) / len(chosen),
                     "network_gain_db": sum(network[c] for c in chosen) / len(chosen), "ssim_gain": 0.0})
    return rows


def _report(split: str = "val") -> dict[str, Any]:
    zero = dict.fromkeys(STEP, 0.0)
    rows = (_rows("bicubic", zero, zero, split) + _rows("bicubic+consistency", STEP, zero, split)
            # Learned nothing: its network is bicubic, its system gain is the step's.
            + _rows("srgan", STEP, dict.fromkeys(STEP, 0.01), split)
            # Learned: denoises the realistic track, adds beyond the step on the clean one.
            + _rows("espcn", {**STEP, ("clean", "mri"): 0.6, ("realistic", "xray"): 3.0},
                    {("clean", "mri"): 0.6, ("clean", "xray"): -1.0, ("realistic", "mri"): 0.2, ("realistic", "xray"): 3.0},
                    split)
            # The longest names the project has, with signed losses in every cell: the widest rows a log shows.
            + _rows("residual_cnn", dict.fromkeys(STEP, -2.34), dict.fromkeys(STEP, -2.34), split)
            + _rows("swift_srgan", dict.fromkeys(STEP, -2.34), dict.fromkeys(STEP, -2.34), split))
    models = {"srgan": {"x4": {"params": 162_945, "model_options": {"n_feats": 32, "n_blocks": 4}}},
              "espcn": {"x4": {"params": 61_840, "model_options": {}}}}
    return {"results" if split == "test" else "validation": rows, "models": models}


def test_learning_check_refuses_a_gain_that_is_the_consistency_steps_alone() -> None:
    checks = {c.model: c for c in learning_checks(_report())}
    assert set(checks) == {"srgan", "espcn", "residual_cnn", "swift_srgan"}  # the baselines are not checked
    assert not checks["srgan"].beats_baseline
    assert checks["srgan"].system_mean_db == checks["srgan"].baseline_mean_db
    assert checks["espcn"].learned and checks["espcn"].beats_baseline
    assert checks["espcn"].network_mean_db == (0.6 - 1.0 + 0.2 + 3.0) / 4
    assert checks["srgan"].size == "n_blocks 4, n_feats 32" and checks["espcn"].size == "defaults"


def test_tables_show_both_numbers_and_the_baseline_row() -> None:
    tables = results_tables(_report("test"), "test")
    assert [t.title.split(":")[0] for t in tables] == ["test, x4, clean track", "test, x4, realistic track"]
    clean = {row[0]: row[1:] for row in tables[0].rows}
    assert tables[0].columns == ["model", "ct", "mri", "xray", "all"]
    assert clean["bicubic+consistency"] == ["+0.40", "+0.40", "+0.40", "+0.40"]
    assert clean["espcn"] == ["+0.60/+0.60", "+0.60/+0.60", "+0.40/-1.00", "+0.53/+0.07"]
    assert clean["n"] == ["6/1", "6/1", "6/1", "12/2"]
    text = markdown(tables)
    assert "| espcn | +0.60/+0.60 |" in text


def test_tables_fit_an_80_column_log_without_cutting_numbers() -> None:
    checks = learning_checks(_report())
    for table_data in [*results_tables(_report("test"), "test"), learning_table(checks), sizes_table(checks)]:
        out = io.StringIO()
        console = Console(file=out, width=80, force_terminal=False)
        console.print(table_data.to_rich())  # what `medsr summary` prints
        printed = out.getvalue()
        assert "…" not in printed, printed
        assert max(len(line) for line in printed.splitlines()) <= 80
        for row in table_data.rows:  # no cell wrapped onto a second line
            assert all(cell in printed for cell in row), (row, printed)


def test_results_document_has_the_learning_check_and_both_splits() -> None:
    report = {**_report("test"), **_report("val")}
    text = results_document(report)
    assert text.startswith("# Results") and "## Test split" in text and "## Validation split" in text
    assert "| srgan x4 | +0.01 | +0.40/+0.40 | +0.00/+0.00 | yes | no |" in text
    assert "| srgan x4 | n_blocks 4, n_feats 32 | 163k |" in text


def test_report_rewrites_only_the_readme_results_block_and_keeps_it_single(tmp_path: Any) -> None:
    from medsr.reporting import README_BEGIN, README_END, with_readme_results

    readme = f"# MedSR\n\nintro\n\n{README_BEGIN}\nstale table\n{README_END}\n\n## After\ntext\n"
    once = with_readme_results(readme, _report())
    twice = with_readme_results(once, _report())
    assert once == twice  # rerunning the report does not grow the README
    assert "stale table" not in once
    assert once.startswith("# MedSR\n\nintro\n\n") and once.endswith(f"{README_END}\n\n## After\ntext\n")
    block = once[once.index(README_BEGIN):once.index(README_END)]
    assert block.count("| srgan x4 | n_blocks 4, n_feats 32 | 163k |") == 1
    srgan = next(line for line in block.splitlines() if line.startswith("| srgan x4"))
    espcn = next(line for line in block.splitlines() if line.startswith("| espcn x4"))
    # srgan's gain is the step's alone: same as the baseline on each track, so it does not earn its row.
    assert srgan.endswith("| +0.01 | +0.40 / +0.40 | +0.00 / +0.00 | no |"), srgan
    assert espcn.endswith("| yes |"), espcn


def test_report_refuses_a_readme_without_its_markers() -> None:
    import pytest

    from medsr.reporting import README_BEGIN, README_END, with_readme_results

    for broken in ("# MedSR\n", f"{README_END}\n{README_BEGIN}\n"):
        with pytest.raises(ValueError, match="results block"):
            with_readme_results(broken, _report())


def test_the_committed_readme_has_one_results_block() -> None:
    from pathlib import Path

    from medsr.reporting import README_BEGIN, README_END

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    assert text.index(README_BEGIN) < text.index(README_END)
