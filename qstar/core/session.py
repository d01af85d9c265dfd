"""A training `Session` (a backend's model, optimizer and random state) stepping on `Batch`es: what the training loop
(qstar/core/trainer.py) drives, written once, and the helpers every session shares."""

from __future__ import annotations

from contextlib import AbstractContextManager
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
    hard: np.ndarray | None = None
    """(B, L) bool: the hard tokens (e.g. the answers of the synthetic corpus), when the data marks them."""


class Session(Protocol):
    parallel: str
    """How several processes hold the model (e.g. "weights sharded (FSDP2)"), for the run's header."""

    @property
    def model(self) -> QStarModel: ...

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        """One optimizer step over grad-accumulation micro-batches; returns the mean metrics and grad_norm."""

    def evaluate(self, batches: list[Batch], seed: int) -> dict[str, float]:
        """Mean metrics without gradient, thoughts drawn from a generator seeded with `seed`."""

    def gathered(self) -> AbstractContextManager[None]:
        """Every rank's random state (and, sharded, the whole weights and optimizer state) collected for a save:
        a collective that every rank enters; rank 0 saves inside it."""

    def write_state(self, directory: Path) -> None:
        """Optimizer state, master weights and random state (every rank's) into `directory`."""

    def read_state(self, directory: Path) -> None: ...

    def peak_memory(self) -> float:
        """Peak memory in GB (device memory on accelerators, else resident set)."""


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over micro-batches or report windows."""
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


HARD_SUMS = ("hard_tokens", "nll_base_hard_sum", "nll_talk_hard_sum")


def hard_token_sums(
    nll_base: np.ndarray, nll_talk: np.ndarray, streams: np.ndarray, hard: np.ndarray
) -> dict[str, float]:
    """Over the hard tokens of a batch that a thought precedes: how many, and the sums of their NLL without and after
    the thought (the next-token prediction, lookahead j = 1). nll_base (R, L-1) and nll_talk (R, S_1) per thought
    row (LossTerms), `streams` the layout's thinking positions, hard (B, L) (Batch.hard); stream p predicts token
    p + 1."""
    scored = streams[: nll_talk.shape[1]]
    flags = np.repeat(hard[:, scored + 1], nll_base.shape[0] // hard.shape[0], axis=0).astype(np.float64)
    return {
        "hard_tokens": float(flags.sum()),
        "nll_base_hard_sum": float((nll_base[:, scored] * flags).sum()),
        "nll_talk_hard_sum": float((nll_talk * flags).sum()),
    }


def evaluation_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """The mean metrics of held-out batches; with hard_token_sums in them, the mean NLL over all their hard tokens
    without (nll_base_hard) and with (nll_talk_hard) the thought, in place of the sums."""
    means = mean_metrics(records)
    if "hard_tokens" not in means:
        return means
    count = max(means.pop("hard_tokens"), 1e-12)
    base, talk = means.pop("nll_base_hard_sum"), means.pop("nll_talk_hard_sum")
    return {**means, "nll_base_hard": base / count, "nll_talk_hard": talk / count}
