"""The gateway's admission of file requests: `threads` compute, a short queue waits in arrival
order, 429 beyond it, and no queue at all while overloaded (serving.max_in_flight, shed_seconds)."""

from __future__ import annotations

import asyncio

import pytest

from serving.errors import GatewayMiddleware


def _gateway(shed_seconds: float = 2.0) -> GatewayMiddleware:
    return GatewayMiddleware(None, max_upload_bytes=1, max_array_output_pixels=1, max_in_flight=4, computing=2,
                             shed_seconds=shed_seconds)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _run(scenario) -> None:  # noqa: ANN001 - a coroutine function
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))  # a request stuck in the queue fails, not hangs


def test_two_compute_two_wait_in_order_and_the_fifth_is_refused() -> None:
    async def scenario() -> None:
        gate = _gateway()
        assert await gate.admit() and await gate.admit()
        third, fourth = asyncio.create_task(gate.admit()), asyncio.create_task(gate.admit())
        await _settle()
        assert not third.done() and not fourth.done() and gate.in_flight == 4
        gate.release()  # a slot frees: the first to wait gets it
        await _settle()
        assert third.done() and third.result() is True and not fourth.done()
        gate.release()
        await _settle()
        assert fourth.result() is True and gate.running == 2 and not gate.waiting

    _run(scenario)


def test_an_overflow_refuses_the_queue_and_queues_nothing_while_overloaded() -> None:
    async def scenario() -> None:
        gate = _gateway()
        assert await gate.admit() and await gate.admit()
        waiting = [asyncio.create_task(gate.admit()) for _ in range(2)]
        await _settle()
        assert await gate.admit() is False  # the fifth: the queue cannot drain in time
        await _settle()
        assert [task.result() for task in waiting] == [False, False] and gate.in_flight == 2
        assert await gate.admit() is False  # overloaded: no queue, although 2 of 4 places are free
        gate.release()
        assert await gate.admit() is True  # a free computing slot is taken at once
        gate.last_refusal -= 3.0  # shed_seconds later
        later = asyncio.create_task(gate.admit())
        await _settle()
        assert not later.done() and gate.in_flight == 3  # it waits again
        gate.release()
        await _settle()
        assert later.result() is True

    _run(scenario)


def test_a_client_that_leaves_while_waiting_takes_no_slot() -> None:
    async def scenario() -> None:
        gate = _gateway()
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
