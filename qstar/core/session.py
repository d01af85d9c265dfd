"""A training `Session` (a backend's model, optimizer and random state) stepping on `Batch`es: what the training loop
(qstar/core/trainer.py) drives, and what every session shares, written once: validation, its hard-token metrics,
and the check that a run resumes with as many processes as it was saved with."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qstar.core.data import Batch
from qstar.core.distributed import World
from qstar.core.model import QStarModel


@dataclass
class Scored:
    """One batch's forward without gradient: the step's metrics, and the NLL of the next token without (nll_base,
    (R, L-1)) and after (nll_talk, (R, S_1)) the thought, rows per thought (b0p0, b0p1, ...)."""

    metrics: dict[str, float]
    nll_base: np.ndarray
    nll_talk: np.ndarray


class Session(Protocol):
    parallel: str
    """How several processes hold the model (e.g. "weights sharded (FSDP2)"), for the run's header."""
    world: World

    @property
    def model(self) -> QStarModel: ...

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        """One optimizer step over grad-accumulation micro-batches; returns the mean metrics and grad_norm."""

    def score(self, batch: Batch) -> Scored:
        """This rank's rows of a batch through the model without gradient."""

    def seeded(self, seed: int) -> AbstractContextManager[None]:
        """Thoughts drawn from a generator seeded with `seed` inside; the training draws go on after it as if it had
        not run."""

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


def token_sums(
    name: str, nll_base: np.ndarray, nll_talk: np.ndarray, streams: np.ndarray, flags: np.ndarray
) -> dict[str, float]:
    """Over the flagged tokens of a batch that a thought precedes: how many, and the sums of their NLL without and
    after the thought (the next-token prediction, lookahead j = 1). nll_base (R, L-1) and nll_talk (R, S_1) per
    thought row (LossTerms), `streams` the layout's thinking positions, flags (B, L) bool; stream p predicts token
    p + 1."""
    scored = streams[: nll_talk.shape[1]]
    weight = np.repeat(flags[:, scored + 1], nll_base.shape[0] // flags.shape[0], axis=0).astype(np.float64)
    return {
        f"{name}_tokens": float(weight.sum()),
        f"nll_base_{name}_sum": float((nll_base[:, scored] * weight).sum()),
        f"nll_talk_{name}_sum": float((nll_talk * weight).sum()),
    }


def evaluation_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """The mean metrics of held-out batches; the token_sums in them become the mean NLL over all those tokens without
    (nll_base_NAME) and with (nll_talk_NAME) the thought."""
    means = mean_metrics(records)
    for name in [k.removesuffix("_tokens") for k in means if k.endswith("_tokens")]:
        count, base, talk = (means.pop(k) for k in (f"{name}_tokens", f"nll_base_{name}_sum", f"nll_talk_{name}_sum"))
        if count > 0:  # (data that marks no hard token has no hard-token NLL)
            means[f"nll_base_{name}"], means[f"nll_talk_{name}"] = base / count, talk / count
    return means


def evaluate(session: Session, batches: list[Batch], seed: int) -> dict[str, float]:
    """Mean metrics of held-out batches without gradient, thoughts drawn from a generator seeded with `seed` (the same
    thoughts at every validation): the loss terms' means, and over every rank's tokens the next-token NLL without and
    after the thought (nll_base_next, nll_talk_next) and, where the data marks them, that of the hard tokens
    (nll_base_hard, nll_talk_hard)."""
    with session.seeded(seed):
        records = []
        for batch in batches:
            scored = session.score(batch)
            streams = session.model.layout(batch.ids.shape[1]).streams
            records.append(dict(scored.metrics))
            records[-1].update(token_sums("next", scored.nll_base, scored.nll_talk, streams, batch.mask))
            if batch.hard is not None:
                records[-1].update(token_sums("hard", scored.nll_base, scored.nll_talk, streams, batch.hard))
    return evaluation_metrics([session.world.mean(mean_metrics(records))])


def check_ranks(directory: Path, saved: int, world: World, launch: str) -> None:
    """A run resumes with as many processes as saved its checkpoint (each rank's random state is in it)."""
    if saved != world.size:
        raise ValueError(
            f"{directory} was saved by a run of {saved} process(es), this one has {world.size}: resume it with as "
            f"many ({launch} {saved})"
        )
