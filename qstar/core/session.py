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
from qstar.core.thinker import NO_THOUGHTS


@dataclass
class Scored:
    """One batch's forward without gradient: the step's metrics, the NLL of the next token without (nll_base,
    (R, L-1)) and after (nll_talk, (R, S_1)) the thought, and the thoughts, rows per thought (b0p0, b0p1, ...)."""

    metrics: dict[str, float]
    nll_base: np.ndarray
    nll_talk: np.ndarray
    thoughts: np.ndarray
    """(R, S, k) the thoughts sampled (rows b0p0, b0p1, ...)."""


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


def thought_diversity(thoughts: list[np.ndarray], per_position: int) -> dict[str, float]:
    """How varied the thoughts sampled at real positions are, (n, P, k) a batch (the P thoughts of one position
    together): `thought_distinct`, the share of distinct thoughts among the P of a position (1/P: all alike);
    `thought_entropy`, the entropy in nats of the token at each thought step over every thought, averaged over the
    steps (0: one string everywhere); `thought_mode`, the share of the commonest thought. A collapse to one string,
    pause tokens rather than thoughts (docs/REAL.md), shows as entropy 0 and mode 1."""
    grouped = np.concatenate(thoughts)
    if not len(grouped):
        return {}
    flat = grouped.reshape(-1, grouped.shape[-1])
    distinct = np.mean([len({t.tobytes() for t in position}) / per_position for position in grouped])
    entropies = []
    for column in flat.T:
        p = np.unique(column, return_counts=True)[1] / len(column)
        entropies.append(float(-(p * np.log(p)).sum()))
    _, counts = np.unique(flat, axis=0, return_counts=True)
    return {
        "thought_distinct": float(distinct),
        "thought_entropy": float(np.mean(entropies)),
        "thought_mode": float(counts.max() / len(flat)),
    }


def positions_thoughts(thoughts: np.ndarray, streams: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, P, k) the thoughts (R, S, k) of the streams at real tokens (mask (B, L)), the P of a position together."""
    rows, _, k = thoughts.shape
    batch = mask.shape[0]
    per_row = thoughts.reshape(batch, rows // batch, len(streams), k).transpose(0, 2, 1, 3)  # (B, S, P, k)
    return per_row[mask[:, streams]]


def evaluate(session: Session, batches: list[Batch], seed: int) -> dict[str, float]:
    """Mean metrics of held-out batches without gradient, thoughts drawn from a generator seeded with `seed` (the same
    thoughts at every validation): the loss terms' means, and over every rank's tokens the next-token NLL without and
    after the thought (nll_base_next, nll_talk_next) and, where the data marks them, that of the hard tokens
    (nll_base_hard, nll_talk_hard); how varied the thoughts are (thought_diversity) where thoughts are sampled."""
    with session.seeded(seed):
        records, sampled = [], []
        for batch in batches:
            scored = session.score(batch)
            streams = session.model.layout(batch.ids.shape[1]).streams
            records.append(dict(scored.metrics))
            records[-1].update(token_sums("next", scored.nll_base, scored.nll_talk, streams, batch.mask))
            if batch.hard is not None:
                records[-1].update(token_sums("hard", scored.nll_base, scored.nll_talk, streams, batch.hard))
            sampled.append(positions_thoughts(scored.thoughts, streams, batch.mask))
    thinking = session.model.step_mode != NO_THOUGHTS
    diversity = thought_diversity(sampled, sampled[0].shape[1]) if thinking and sampled else {}
    return evaluation_metrics([session.world.mean(mean_metrics(records) | diversity)])


def check_ranks(directory: Path, saved: int, world: World, launch: str) -> None:
    """A run resumes with as many processes as saved its checkpoint (each rank's random state is in it)."""
    if saved != world.size:
        raise ValueError(
            f"{directory} was saved by a run of {saved} process(es), this one has {world.size}: resume it with as "
            f"many ({launch} {saved})"
        )
