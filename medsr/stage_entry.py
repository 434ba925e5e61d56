"""Running one DVC stage from ``stages/<name>.py``: load params, call the stage function, turn a
user-facing failure into one line on stderr and exit code 1.

Kept apart from :mod:`medsr.cli` on purpose: a stage script that went through the CLI would import
(and so, for DVC, depend on) every command's code; this module imports almost nothing, so each
stage's ``deps`` in dvc.yaml stay the files its own function needs (``tests/test_stage_deps.py``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

METRICS_DIR = Path("metrics")
PAIRS_DIR = Path("data/pairs")  # the degrade stage's out (dvc.yaml), read by train, benchmark and register
MODELS_DIR = Path("models")  # the train stages' outs (models/<model>/x<scale>), read by benchmark and register
PARAMS_PATH = Path("params.yaml")


class StageFailed(RuntimeError):
    """A stage refused to go on; the message is one readable line for the user."""


def one_line(err: BaseException) -> str:
    """The error's first line (a library's multi-line message would flood a DVC log)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_stage(name: str, func: Callable[[dict[str, Any]], dict[str, Any]],
              report: Callable[[dict[str, Any]], str] | None = None, *,
              errors: tuple[type[BaseException], ...] = (), params_path: Path = PARAMS_PATH) -> int:
    """Run ``func(params)``; print ``report(summary)`` and return 0, or one error line and return 1.

    ``errors`` adds stage-specific user-facing exception types to the shared ones (a bad source,
    a bad params.yaml, a refused stage); anything else is a bug and keeps its traceback.
    """
    from medsr.data.sources.errors import SourceError
    from medsr.params import ParamsError, load_params

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internals
    try:
        summary = func(load_params(params_path))
    except (SourceError, ParamsError, StageFailed, *errors) as err:
        print(f"medsr {name}: {one_line(err)}", file=sys.stderr, flush=True)
        return 1
    if report is not None:
        print(report(summary), flush=True)
    return 0
