"""Admission of file requests by expected wait, and the bodies they are admitted with.

A request is admitted only once its whole body is in (:class:`BodyBuffer`, within the read
deadline): a slow upload no longer holds one of the ``computing`` slots while it trickles in.
Then :class:`Admission` lets it compute at once when a slot is free, else queue in arrival order
while the expected wait (the requests ahead of it x the measured time per request / slots) stays
within ``serving.max_wait_s``; beyond that, or past ``serving.max_in_flight``, it is refused (429)
with that expected wait as ``Retry-After``. Measured before (issue 22): a constant 1 s
``Retry-After`` for a queue that drains in ~0.3 s gave 16 clients a quarter of the throughput of 4.
"""

from __future__ import annotations

import asyncio
import collections
import math
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

Receive = Callable[[], Awaitable[dict[str, Any]]]


class Admission:
    """``computing`` requests at once; a queue bounded by expected wait and ``max_in_flight``.

    The time per request is an exponentially weighted mean (weight ``smoothing``) of the time
    from admission to release; one event loop runs all of this, so there are no locks.
    """

    def __init__(self, computing: int, max_in_flight: int, max_wait_s: float, smoothing: float = 0.2) -> None:
        self.computing = max(1, int(computing))
        self.max_in_flight = max(self.computing, int(max_in_flight))
        self.max_wait_s = float(max_wait_s)
        self.smoothing = float(smoothing)
        self.seconds_per_request = 0.0  # unknown until the first request finishes: queue freely
        self.running = 0
        self.waiting: collections.deque[asyncio.Future[bool]] = collections.deque()

    @property
    def in_flight(self) -> int:
        """Admitted and not yet released: computing or waiting."""
        return self.running + len(self.waiting)

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait for a slot (0 when one is free)."""
        if not self.waiting and self.running < self.computing:
            return 0.0
        return (len(self.waiting) + 1) * self.seconds_per_request / self.computing

    def retry_after(self) -> int:
        """``Retry-After`` for a refusal now: the expected wait, in whole seconds (at least 1)."""
        return max(1, math.ceil(self.expected_wait()))

    async def admit(self) -> bool:
        """Wait for a slot; False: refused (the caller answers 429 with :meth:`retry_after`)."""
        if not self.waiting and self.running < self.computing:
            self.running += 1
            return True
        if self.in_flight >= self.max_in_flight or self.expected_wait() > self.max_wait_s:
            return False
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            return await waiter  # release() hands over the slot (running already counts us)
        except asyncio.CancelledError:  # the client went away while waiting
            if waiter in self.waiting:
                self.waiting.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # the slot came as we were cancelled: pass it on
            raise

    def release(self, seconds: float | None = None) -> None:
        """Free a slot (``seconds``: how long the request held it, for the mean) and hand it on."""
        if seconds is not None and seconds >= 0:
            known = self.seconds_per_request
            self.seconds_per_request = seconds if known == 0.0 else known + self.smoothing * (seconds - known)
        self.running -= 1
        while self.waiting and self.running < self.computing:
            waiter = self.waiting.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(True)


class ReadDeadline(Exception):
    """The body did not arrive within the read deadline (408)."""


def deadline_receive(receive: Receive, seconds: float) -> Receive:
    """``receive`` that raises :class:`ReadDeadline` once ``seconds`` have passed since now."""
    deadline = time.monotonic() + float(seconds)

    async def timed() -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReadDeadline
        try:
            return await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            raise ReadDeadline from None

    return timed


class BodyBuffer:
    """A request body held until the request is admitted: memory up to ``spool_bytes``, then a
    temporary file; :meth:`replay` hands it to the app as ASGI messages."""

    CHUNK = 1 << 20

    def __init__(self, spool_bytes: int = 1 << 20) -> None:  # 64 queued uploads hold at most 64 MiB of memory
        self.file: BinaryIO = tempfile.SpooledTemporaryFile(max_size=spool_bytes, prefix="medsr-body-")  # type: ignore[assignment]
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.file.write(data)
            self.size += len(data)

    def replay(self, receive: Receive) -> Receive:
        """The body in chunks, then the connection's own ``receive`` (a disconnect, when it comes)."""
        self.file.seek(0)
        done = {"body": False}

        async def replayed() -> dict[str, Any]:
            if done["body"]:
                return await receive()
            chunk = self.file.read(self.CHUNK)
            more = self.file.tell() < self.size
            if not more:
                done["body"] = True
                self.close()
            return {"type": "http.request", "body": chunk, "more_body": more}

        return replayed

    def close(self) -> None:
        self.file.close()
