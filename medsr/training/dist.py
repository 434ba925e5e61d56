"""The collectives of data-parallel training (PyTorch DDP): the leaf the trainer calls.

``train.nproc: N`` (or ``medsr train <model> --nproc N``) makes the train stage start N ranks
through ``torchrun`` (:mod:`medsr.training.launch`); each rank runs the same train stage, which
sees ``WORLD_SIZE`` and trains its shard:

* every rank builds the batch of step ``k`` from ``(seed, k)`` as one process would and keeps
  its slice (``batch_size`` must divide by ``N``): the global batch and its content do not
  depend on the number of ranks;
* ``DistributedDataParallel`` averages the gradients (NCCL on CUDA, gloo on CPU), so every rank
  takes the same optimiser step a single process takes on the whole batch;
* BatchNorm: on CUDA the modules become ``SyncBatchNorm`` (batch statistics over the global
  batch). torch's ``SyncBatchNorm`` refuses CPU tensors, so CPU ranks normalise with their own
  shard's statistics (DDP's default) and their running statistics are rank 0's, broadcast at
  each forward: a BatchNorm model on N CPU ranks is close to, not equal to, the one-process run;
* rank 0 alone validates, writes checkpoints, metrics and the MLflow run; the others wait for
  its early-stopping decision;
* ``nproc`` is not part of the training digest (:mod:`medsr.training.stage`), so a run killed on
  N ranks resumes on any number of ranks.

This module imports torch and nothing of the project, so the trainer can depend on it without
depending on the stage that launches ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 validates alone while the others wait in a collective: give that wait room (a full-profile
# validation on a GPU can take minutes; the default gloo/NCCL timeouts would kill the job).
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: one process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process that ``torchrun`` started (it sets ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def context() -> Context:
    """This process's rank, world size and local rank (1 process when no group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return Context()


def init(device: str = "auto") -> Context:
    """Join the process group ``torchrun`` describes in the environment: NCCL when this run trains on
    CUDA, gloo on CPU. Idempotent; a process not started by torchrun stays a single process."""
    if not launched() or int(os.environ["WORLD_SIZE"]) < 1:
        return Context()
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"rank {os.environ['RANK']}: local rank {local_rank} but only "
                                   f"{torch.cuda.device_count()} CUDA devices; lower train.nproc")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return context()


def shutdown() -> None:
    """Leave the process group (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if context().distributed:
        dist.barrier()


def broadcast_value(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` holds it, on every rank (identity for a single process)."""
    if not context().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ranks (the tensor itself for a single process). A NaN on any
    rank makes the mean NaN on every rank, so all of them stop at the same step."""
    if not context().distributed:
        return values
    total = values.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()
