"""Data-parallel training under mlx.launch (mx.distributed: the ring backend over TCP, or whichever mlx.launch
set up): the World it gives the training loop (qstar/core/distributed.py)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import mlx.core as mx
import numpy as np

from qstar.core.distributed import World, launched_size


def join() -> World:
    """This process's place in the run: alone, or a rank of the group mlx.launch started (MLX_RANK is set)."""
    if launched_size() > 1:
        raise ValueError("WORLD_SIZE is set (torchrun): the MLX backend runs under mlx.launch; use --backend torch")
    if "MLX_RANK" not in os.environ:
        return World()
    group = mx.distributed.init(strict=True)
    if group.size() == 1:
        return World()

    def gather(value: Any) -> list[Any]:
        data = np.frombuffer(pickle.dumps(value), np.uint8)
        sizes = np.array(mx.distributed.all_gather(mx.array([data.size], mx.int32), stream=mx.cpu))
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: data.size] = data
        rows = np.array(mx.distributed.all_gather(mx.array(padded), stream=mx.cpu)).reshape(len(sizes), -1)
        return [pickle.loads(row[:n].tobytes()) for row, n in zip(rows, sizes, strict=True)]

    def barrier() -> None:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), stream=mx.cpu))

    return World(group.rank(), group.size(), barrier, gather)
