"""Rank, world size and barriers for training under torchrun: the one module that knows about processes.

Started by `torchrun ... -m xray train`, every process runs the same pipeline; rank 0 alone runs the
stages that touch storage and artifacts (`main_only`) while the others wait for its result, and all
ranks train together. Without torchrun's environment this is one process of rank 0, and every
function here costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


def world_size() -> int:
    """How many processes train together (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's place among them, 0 to world_size - 1 (torchrun's RANK)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's place on its own machine, which picks its GPU (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many processes train on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether several processes train together."""
    return world_size() > 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that reads data, writes artifacts and pushes models."""
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (by local rank) when training on CUDA."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def session(use_cuda: bool) -> Iterator[None]:
    """Join the process group for the block when under torchrun (NCCL on CUDA, gloo on CPU), and leave it after.

    The other ranks' standard output and INFO logs are silenced from then on, so a run reports once, from rank 0.
    """
    if not is_distributed() or dist.is_initialized():
        yield
        return
    backend = "nccl" if use_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    logger.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    if not is_main():
        # For the rest of the process: what the CLI prints after the run is rank 0's to print.
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if dist.is_initialized():
        dist.barrier()


def main_only(step: Callable[[], Result]) -> Result:
    """Run `step` on rank 0 alone while the other ranks wait, then hand every rank its result.

    If rank 0 fails, every rank raises its error (so all stop, none waits forever).
    """
    if not dist.is_initialized():
        return step()
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome[0] = ("result", step())
        except Exception as error:
            outcome[0] = ("error", _shareable(error))
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def agree(value: Result) -> Result:
    """Rank 0's `value` on every rank: for decisions (stop early, out of time) all ranks must take together."""
    if not dist.is_initialized():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (picklable values such as numpy arrays)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _shareable(error: Exception) -> Exception:
    """The error itself if it can travel to the other ranks, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    return error
