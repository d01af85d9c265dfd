"""A training `Session` (a backend's model, optimizer and random state) stepping on `Batch`es: what the training loop
(qstar/core/trainer.py) drives, written once, and the helpers every session shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qstar.core.api import QStarModel


@dataclass
class Batch:
    ids: np.ndarray
    """(B, L) int64."""
    mask: np.ndarray
    """(B, L) bool, right-padded."""


class Session(Protocol):
    @property
    def model(self) -> QStarModel: ...

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        """One optimizer step over grad-accumulation micro-batches; returns the mean metrics and grad_norm."""

    def evaluate(self, batches: list[Batch], seed: int) -> dict[str, float]:
        """Mean metrics without gradient, thoughts drawn from a generator seeded with `seed`."""

    def write_state(self, directory: Path) -> None:
        """Optimizer state, master weights and random state into `directory`."""

    def read_state(self, directory: Path) -> None: ...

    def peak_memory(self) -> float:
        """Peak memory in GB (device memory on accelerators, else resident set)."""


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over micro-batches or report windows."""
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
