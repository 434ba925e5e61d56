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
from typing import Any, NoReturn

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


def exit_stage(code: int) -> NoReturn:
    """End a stage's process with ``code`` once its work is done, skipping the interpreter's teardown.

    Tearing down the modules a stage imports (torch, MLflow, SQLAlchemy, pandas) took 3.3 s of a train
    stage's exit here (``import torch`` alone: 0.9 s), ~30 s of a ``make run`` over its stages. What a
    stage writes is closed before it returns (atomic_path, with-blocks); what a normal exit does that
    matters still happens, in its order: other non-daemon threads are joined, the atexit handlers run
    (logging's flush, MLflow's end of run, multiprocessing's cleanup), the standard streams are flushed.
    Only for ``stages/*.py`` (a process of its own): a caller inside a longer-lived process would end it.
    """
    import atexit
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs (CPython's own entry point for them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
