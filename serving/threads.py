"""How many torch intra-op threads a request computes with.

``serving.torch_threads: N`` (N >= 1): every request runs on N threads. ``0``: adaptive: a request
that computes alone gets every core, and when ``k`` requests compute at once each gets
``cores // k`` (at least 1). Measured on 2 cores (benchmarks/bench_serving.py): one request on 2
threads forwards ESPCN x4 256^2 in ~50 ms against ~70 ms on 1, while two requests on 1 thread
each keep both cores busy without the OpenMP spinning that 2 x 2 threads cause.

torch's thread count is an OpenMP setting of the calling thread, so each request sets its own:
on entry its share, then before each phase (forward, refine, score) and each layer of the
network (:meth:`ThreadBudget.follow_layers`) the smaller of that and the share now. A request
that started alone drops to its share within one layer when another arrives: a two-thread
OpenMP region sharing its cores with another request's thread waits at every barrier for its
descheduled half (a 40 ms forward took 280 ms, measured at 16 clients when it was re-checked only
per phase). A request never grows mid-request: under load, requests come and go every few
milliseconds, and one that took two threads whenever it was alone for a moment would keep
running into the next arrival.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from medsr.inference import available_cores


class ThreadBudget:
    """Shares ``cores`` among the requests computing at once (``fixed`` > 0: that many each)."""

    def __init__(self, fixed: int, cores: int | None = None) -> None:
        if int(fixed) < 0:
            raise ValueError(f"serving.torch_threads must be >= 0 (0: adaptive), got {fixed}")
        self.fixed = int(fixed)
        self.cores = int(cores or available_cores())
        self._active = 0
        self._lock = threading.Lock()
        self._granted = threading.local()  # the threads this request started with

    @property
    def active(self) -> int:
        return self._active

    def share(self) -> int:
        """The threads one computing request gets now."""
        if self.fixed:
            return self.fixed
        return max(1, self.cores // max(1, self._active))

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Count the calling request as computing while inside (sets its threads on entry)."""
        with self._lock:
            self._active += 1
        self._granted.threads = self.share()
        try:
            self.apply()
            yield
        finally:
            with self._lock:
                self._active -= 1
            self._granted.threads = None

    def apply(self) -> None:
        """Set the calling thread's torch threads: the current share, never above what the request
        started with (a helper thread of the request, e.g. the scorer, gets the current share)."""
        import torch

        threads = self.share()
        granted = getattr(self._granted, "threads", None)
        if granted is not None:
            threads = min(threads, granted)
            self._granted.threads = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def follow_layers(self, module: Any) -> None:
        """Re-check the calling request's threads before every leaf layer of ``module`` (a
        ``torch.nn.Module``): a forward pass is one phase but many OpenMP regions."""
        for layer in module.modules():
            if next(layer.children(), None) is None:
                layer.register_forward_pre_hook(lambda _layer, _inputs: self.apply())
