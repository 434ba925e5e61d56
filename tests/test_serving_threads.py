"""serving.torch_threads: every core for a request computing alone, an equal share when several do."""

from __future__ import annotations

import threading

import pytest
import torch

from serving.threads import ThreadBudget


def _threads_inside(budget: ThreadBudget, together: int) -> list[int]:
    """The torch threads each of ``together`` requests computes with when they overlap."""
    inside = threading.Barrier(together)
    seen: list[int] = []

    def request() -> None:
        with budget.computing():
            inside.wait(timeout=10)  # every request is counted before any re-reads its share
            budget.apply()
            seen.append(torch.get_num_threads())
            inside.wait(timeout=10)

    workers = [threading.Thread(target=request) for _ in range(together)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    return sorted(seen)


def test_adaptive_budget_shares_the_cores_among_computing_requests() -> None:
    budget = ThreadBudget(0, cores=2)
    assert _threads_inside(budget, 1) == [2]
    assert _threads_inside(budget, 2) == [1, 1]
    assert _threads_inside(budget, 3) == [1, 1, 1]  # never 0
    assert budget.active == 0 and budget.share() == 2
    assert _threads_inside(ThreadBudget(0, cores=4), 2) == [2, 2]


def test_fixed_budget_ignores_the_load() -> None:
    assert _threads_inside(ThreadBudget(1, cores=2), 1) == [1]
    assert _threads_inside(ThreadBudget(3, cores=2), 2) == [3, 3]


def test_a_failing_request_leaves_the_count() -> None:
    budget = ThreadBudget(0, cores=2)
    with pytest.raises(RuntimeError), budget.computing():
        raise RuntimeError("decode failed")
    assert budget.active == 0


def test_negative_threads_are_refused() -> None:
    with pytest.raises(ValueError, match="serving.torch_threads"):
        ThreadBudget(-1)
