"""What every download shares: a file's sha256, and retries with exponential backoff.

Used by the Kaggle source, the local-folder source (hashes only) and the published-weights fetch
(:mod:`medsr.pretrained`); each brings its own idea of which failures are worth retrying and what
to tell the user when one is not.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medsr.data.sources.errors import SourceError

HASH_CHUNK = 1 << 20

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def with_retries(action: Callable[[], _T], *, what: str, retries: int, backoff_seconds: float,
                 sleep: Callable[[float], Any], is_transient: Callable[[BaseException], bool],
                 describe: Callable[[BaseException], str], permanent_hint: Callable[[BaseException], str],
                 exhausted_hint: str) -> _T:
    """Run ``action``; retry failures that ``is_transient`` accepts, ``retries`` times, after
    ``backoff_seconds * 2**attempt``; otherwise raise a one-line SourceError.

    A SourceError from ``action`` passes through unchanged (it is already the user's message).
    SystemExit is caught too: a client library that calls ``exit()`` must not end the stage silently.
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except SourceError:
            raise
        except (Exception, SystemExit) as exc:
            if not is_transient(exc):
                raise SourceError(f"{what} failed ({describe(exc)}): {permanent_hint(exc)}") from exc
            if attempt >= retries:
                raise SourceError(f"{what} still failing after {attempt + 1} attempts ({describe(exc)}): "
                                  f"{exhausted_hint}") from exc
            delay = backoff_seconds * 2**attempt
            log.warning("%s: %s; retry %d of %d in %.1f s", what, describe(exc), attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
