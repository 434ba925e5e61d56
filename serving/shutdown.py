"""A bounded shutdown for the API worker.

On SIGTERM uvicorn stops accepting and waits for every open request to finish, with no time
limit, and BentoML's process manager waits a day for the worker (circus ``graceful_timeout``):
one stuck request (an upload that stops halfway, a computation that does not end) kept the
server alive, answering nothing, until SIGKILL. :func:`bound_shutdown` keeps uvicorn's graceful
part and ends the worker ``grace_s`` after the first SIGTERM/SIGINT whatever is still running.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger("bentoml.medsr")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit_after(grace_s: float) -> None:
    logger.warning("shutdown: requests still in flight %.1f s after the signal (serving.shutdown_grace_s): "
                   "ending them and exiting", grace_s)
    for handler in logging.getLogger().handlers + logging.getLogger("bentoml").handlers:
        handler.flush()
    os._exit(1)


def bound_shutdown(grace_s: float) -> bool:
    """Chain a deadline onto the current SIGTERM/SIGINT handlers (uvicorn's, once it is serving).

    Must run on the main thread (BentoML builds the service there, inside uvicorn's signal
    capture); returns False elsewhere (nothing installed).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    started: list[threading.Timer] = []

    def chained(previous: Any) -> Any:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not started:
                logger.info("shutdown: signal %d; in-flight requests get %.1f s to finish", signum, grace_s)
                timer = threading.Timer(grace_s, _exit_after, args=(grace_s,))
                timer.daemon = True
                timer.start()
                started.append(timer)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + signum)

        return handler

    for signum in SIGNALS:
        signal.signal(signum, chained(signal.getsignal(signum)))
    return True
