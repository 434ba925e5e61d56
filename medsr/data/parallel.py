"""One way to run per-item data work in parallel, shared by ingest and degrade.

A :data:`Mapper` is ``(function, items) -> results in the order of items``: the builtin ``map``,
a local spawn process pool's, or a Dask client's. Results always come back in input order, so a
stage that writes them in that order writes the same bytes whatever ran them and however many
workers there were (tests/test_parallel_ingest.py, tests/test_parallel_degrade.py).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

Mapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]


@contextmanager
def parallel_mapper(workers: int = 1, dask_address: str | None = None,
                    initializer: Callable[[], None] | None = None) -> Iterator[Mapper]:
    """A :data:`Mapper` over ``workers`` local processes, or over the Dask cluster at ``dask_address``.

    ``initializer`` runs once in each local worker process (Dask workers are the cluster owner's to
    configure). With Dask, the items' paths must be readable, and the outputs' folders writable,
    by the cluster's workers (a shared file system), just as on this machine.
    """
    if dask_address:
        from distributed import Client

        with Client(dask_address, set_as_default=False) as client:
            def dask_map(func: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
                # pure=False: the same item may be submitted twice (a retried set), never deduplicated.
                futures = client.map(func, items, pure=False)  # submitted now, as a pool's map is
                return _in_order(futures)

            yield dask_map
        return
    if workers <= 1:
        yield map
        return
    # spawn, not fork: the parent may have torch's thread pools running, which a fork can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer) as pool:
        # ~16 chunks per worker: IPC per item is amortised, and a worker slowed by other load or by
        # uneven items (a volume among PNGs) leaves the others at most one small chunk to wait for.
        yield lambda func, items: pool.map(func, items, chunksize=max(1, len(items) // (16 * workers)))


def _in_order(futures: list[Any]) -> Iterator[Any]:
    """Each future's result in submission order, released once taken: the caller holds one result
    (ingest's stored tiles, degrade's pairs) at a time, not the whole run's."""
    for i, future in enumerate(futures):
        yield future.result()
        futures[i] = None
