"""Several processes training one model (data parallel): what the training loop needs to know of them.

Every rank reads the same data stream and steps on its own slice of each global batch of `size * batch_size` whole
sequences (never a part of the P thought rows of one sequence, the REINFORCE baseline group), so N ranks of batch b
see exactly the rows of one process of batch N * b. Rank 0 owns the run directory (lock, metrics, checkpoints);
every rank's random state goes into each checkpoint, and every rank resumes from it. A backend supplies the
collectives (torch: torch.distributed under torchrun).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qstar.core.data import Batch


def _alone_gather(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)
    """Wait until every rank got here."""
    gather: Callable[[Any], list[Any]] = field(default=_alone_gather, repr=False)
    """Every rank's value (a picklable object), in rank order, on every rank."""

    @property
    def main(self) -> bool:
        """Whether this rank writes the run directory and the console."""
        return self.rank == 0

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each metric over the ranks (the same keys on every rank)."""
        if self.size == 1:
            return metrics
        rows = np.array([[m[k] for k in metrics] for m in self.gather(metrics)], np.float64)
        return dict(zip(metrics, rows.mean(axis=0).tolist(), strict=True))

    def share(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch."""
        if self.size == 1:
            return batch
        rows = batch.ids.shape[0] // self.size
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        return replace(
            batch, ids=batch.ids[part], mask=batch.mask[part], hard=None if batch.hard is None else batch.hard[part]
        )


def launched_rank() -> int:
    """This process's rank as a launcher (torchrun, mlx.launch) numbered it; 0 without one."""
    return int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0")))


def launched_size() -> int:
    """How many processes a launcher (torchrun) started for this run; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_node_size() -> int:
    """How many of them torchrun started on this node (its LOCAL_WORLD_SIZE): hsdp's default shard group; 1 without
    a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
