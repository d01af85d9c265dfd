"""Data-parallel training under torchrun: the process group (NCCL on CUDA, gloo on CPU) and the World it gives the
training loop (qstar/core/distributed.py)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from qstar.core.distributed import World, launched_size


def join() -> World:
    """This process's place in the run: alone, or a rank of the group torchrun started (joined once)."""
    size = launched_size()
    if size == 1:
        return World()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def gather(value: Any) -> list[Any]:
        values: list[Any] = [None] * size
        dist.all_gather_object(values, value)
        return values

    return World(dist.get_rank(), size, dist.barrier, gather)
