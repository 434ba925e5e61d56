"""Admission of file requests (serving.admission): `threads` compute, the rest queue in arrival
order while their expected wait stays under serving.max_wait_s, 429 with that wait beyond it."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission import Admission


def _gate(max_in_flight: int = 64, max_wait_s: float = 2.0) -> Admission:
    return Admission(computing=2, max_in_flight=max_in_flight, max_wait_s=max_wait_s)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _run(scenario) -> None:  # noqa: ANN001 - a coroutine function
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))  # a request stuck in the queue fails, not hangs


def test_two_compute_the_rest_wait_in_order() -> None:
    async def scenario() -> None:
        gate = _gate()
        assert await gate.admit() and await gate.admit()
        third, fourth = asyncio.create_task(gate.admit()), asyncio.create_task(gate.admit())
        await _settle()
        assert not third.done() and not fourth.done() and gate.in_flight == 4
        gate.release(0.1)  # a slot frees: the first to wait gets it
        await _settle()
        assert third.result() is True and not fourth.done()
        gate.release(0.1)
        await _settle()
        assert fourth.result() is True and gate.running == 2 and not gate.waiting

    _run(scenario)


def test_refused_by_expected_wait_with_that_wait_as_retry_after() -> None:
    """At 0.5 s a request on 2 slots, the n-th in the queue waits n x 0.25 s: 8 fit in 2 s."""
    async def scenario() -> None:
        gate = _gate()
        assert await gate.admit() and await gate.admit()
        gate.release(0.5)
        assert await gate.admit()
        assert gate.seconds_per_request == pytest.approx(0.5)
        queued = [asyncio.create_task(gate.admit()) for _ in range(8)]
        await _settle()
        assert len(gate.waiting) == 8 and gate.expected_wait() == pytest.approx(9 * 0.25)
        assert await gate.admit() is False  # 2.25 s > max_wait_s
        assert gate.retry_after() == 3  # the expected wait, rounded up to whole seconds
        for _ in range(10):
            gate.release(0.5)
            await _settle()
        assert all(task.result() for task in queued)

    _run(scenario)


def test_max_in_flight_bounds_the_queue_while_the_time_is_unknown() -> None:
    async def scenario() -> None:
        gate = _gate(max_in_flight=4)
        assert await gate.admit() and await gate.admit()
        queued = [asyncio.create_task(gate.admit()) for _ in range(2)]
        await _settle()
        assert gate.expected_wait() == 0.0 and await gate.admit() is False and gate.retry_after() == 1
        for _ in range(4):
            gate.release()
            await _settle()
        assert all(task.result() for task in queued)

    _run(scenario)


def test_a_client_that_leaves_while_waiting_takes_no_slot() -> None:
    async def scenario() -> None:
        gate = _gate()
        assert await gate.admit() and await gate.admit()
        gone = asyncio.create_task(gate.admit())
        await _settle()
        gone.cancel()
        await _settle()
        with pytest.raises(asyncio.CancelledError):
            gone.result()
        assert gate.in_flight == 2 and not gate.waiting
        gate.release()
        assert gate.running == 1

    _run(scenario)
