"""Continuous batching: a request's rows join the running batch at the next token and leave it when they end or their
client goes, on one worker thread that owns the model. Rows that think and rows that do not are two batches
(core.generate.Decoding), stepped in turn; each row's draws are keyed by its own seed (its position and
step), so a request's tokens depend on its seed, never on the requests beside it."""

from __future__ import annotations

import queue
import secrets
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qstar.core.generate import Continuation, Decoding, Emitted, Sampling
from qstar.core.model import QStarModel
from qstar.core.sampling import KeyedNoise

MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """The emitted token's log-probability under the prediction it was drawn from, and the most likely tokens'."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What a row produced at one step, handed to its request's `deliver` on the worker thread."""

    choice: int
    text: str = ""
    """New text safe to show (the pieces of a row add up to its final text)."""
    token: int | None = None
    thought: list[int] | None = None
    """The thought before the token (None without thoughts)."""
    weight: float | None = None
    """The mixing head's weight of the thought side."""
    logprob: TokenLogprob | None = None
    stop: str = ""
    """Set on the row's last event: why it ended (core.generate.STOP_REASONS)."""
    error: str = ""
    """Set when the step failed: the row has ended without a result."""


@dataclass
class Job:
    """One request: `n` rows continuing the same prompt."""

    prompt: list[int]
    sampling: Sampling
    deliver: Callable[[Event], None]
    """Called on the worker thread for every event: must not block."""
    n: int = 1
    seed: int | None = None
    """Row i's noise is seeded by seed (n = 1) or [seed, i]; none: a random seed a row."""
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    """None: no log-probabilities; else the emitted token's and this many of the most likely."""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def seeds(self) -> list[int | list[int]]:
        if self.seed is None:
            return [secrets.randbits(63) for _ in range(self.n)]
        return [self.seed] if self.n == 1 else [[self.seed, i] for i in range(self.n)]


@dataclass
class Row:
    job: Job
    choice: int
    text: Continuation


class Busy(Exception):
    """The queue is full: the caller should retry later."""


class Stopped(Exception):
    """The worker thread has ended: nothing more will be generated."""


class Batcher:
    """Requests in, events out: at most `max_batch` rows decode at once and `max_queue` requests wait."""

    def __init__(self, model: QStarModel, max_batch: int = 16, max_queue: int = 64) -> None:
        self.model, self.max_batch = model, max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self.held: Job | None = None  # taken from the queue, admitted once there is room for its rows
        thinker = model.thinker()
        self.batches = {thoughts: Decoding(thinker, thoughts, KeyedNoise()) for thoughts in (True, False)}
        self.rows: dict[bool, list[Row]] = {True: [], False: []}
        self.closing = threading.Event()
        self.failure = ""
        """What ended the worker thread, when an exception escaped its loop."""
        self.worker = threading.Thread(target=self.run, name="qstar-batcher", daemon=True)

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.closing.set()
        self.worker.join()

    @property
    def dead(self) -> str:
        """Why the worker thread has ended ("" while it runs, or before it starts)."""
        if self.failure or self.worker.ident is None or self.worker.is_alive():
            return self.failure
        return "the worker thread has ended"

    def submit(self, job: Job) -> None:
        """Queue a request; Busy when `max_queue` already wait, Stopped when the worker has ended."""
        if self.dead:
            raise Stopped(self.dead)
        if job.n > self.max_batch:
            raise ValueError(f"n={job.n} is more than the server decodes at once ({self.max_batch}, --max-batch)")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise Busy from None

    @property
    def active(self) -> int:
        return sum(map(len, self.rows.values()))

    def run(self) -> None:
        """The worker's loop. An exception that escapes it ends every request held with the error, and `failure`
        says why, so that nothing waits for a worker that is gone."""
        try:
            while not self.closing.is_set():
                self.admit(block=self.active == 0)
                for thoughts, decoding in self.batches.items():
                    if self.rows[thoughts]:
                        self.guarded(thoughts, decoding)
        except BaseException as err:
            self.failure = f"{type(err).__name__}: {err}"
            rows, self.rows = [*self.rows[True], *self.rows[False]], {True: [], False: []}
            self.fail([*rows, *self.rows_of(self.drain())], err)

    def drain(self) -> list[Job]:
        """Every request taken or waiting, taken out of the queue."""
        jobs, self.held = ([] if self.held is None else [self.held]), None
        while True:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                return jobs

    def admit(self, block: bool) -> None:
        """Move waiting requests into the batches while their rows fit (waiting a moment for one when idle)."""
        joining: dict[bool, list[Job]] = {True: [], False: []}
        while True:
            if self.held is None:
                try:
                    self.held = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
                except queue.Empty:
                    break
                block = False
            job = self.held
            if job.cancelled.is_set():
                self.held = None
                continue
            if self.active + sum(j.n for js in joining.values() for j in js) + job.n > self.max_batch:
                break
            joining[job.sampling.thoughts].append(job)
            self.held = None
        for thoughts, jobs in joining.items():
            if jobs:
                self.join(thoughts, jobs)

    def join(self, thoughts: bool, jobs: list[Job]) -> None:
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        seeds = [seed for job in jobs for seed in job.seeds()]
        try:
            self.batches[thoughts].admit(prompts, seeds)
        except Exception as err:  # a failed prompt pass ends these requests, not the server
            return self.fail(self.rows_of(jobs), err)
        self.rows[thoughts] += self.rows_of(jobs)

    def rows_of(self, jobs: list[Job]) -> list[Row]:
        return [Row(job, i, self.continuation(job)) for job in jobs for i in range(job.n)]

    def continuation(self, job: Job) -> Continuation:
        return self.model.continuation(len(job.prompt), job.sampling.max_tokens, job.stop)

    def guarded(self, thoughts: bool, decoding: Decoding) -> None:
        """One step; if it fails, its rows end with the error and the server goes on."""
        try:
            self.step(thoughts, decoding)
        except Exception as err:
            rows, self.rows[thoughts] = self.rows[thoughts], []
            decoding.keep([])
            self.fail(rows, err)

    def fail(self, rows: Sequence[Row], err: BaseException) -> None:
        traceback.print_exception(err, file=sys.stderr)
        for row in rows:
            row.job.deliver(Event(row.choice, error=f"generation failed: {type(err).__name__}: {err}"))

    def step(self, thoughts: bool, decoding: Decoding) -> None:
        """Every row's next token; rows that ended or whose client went leave the batch."""
        rows = self.rows[thoughts]
        gone = [i for i, row in enumerate(rows) if row.job.cancelled.is_set()]
        if gone:
            rows = self.drop(thoughts, decoding, [i for i in range(len(rows)) if i not in gone])
            if not rows:
                return
        emitted = decoding.step([row.job.sampling for row in rows])
        logprobs = self.logprobs(emitted, [row.job.top_logprobs for row in rows])
        staying = []
        for i, row in enumerate(rows):
            thought = emitted.thoughts[i] if thoughts else None
            weight = None if emitted.weights is None else emitted.weights[i]
            ended = row.text.add(int(emitted.tokens[i]), thought or [], weight)
            token = int(emitted.tokens[i])
            row.job.deliver(Event(row.choice, row.text.delta(), token, thought, weight, logprobs[i], row.text.stop))
            if not ended and not row.job.cancelled.is_set():
                staying.append(i)
        if len(staying) < len(rows):
            self.drop(thoughts, decoding, staying)
        if staying:
            decoding.advance(emitted.tokens[staying], np.ones(len(staying), bool))

    def drop(self, thoughts: bool, decoding: Decoding, staying: list[int]) -> list[Row]:
        decoding.keep(staying)
        self.rows[thoughts] = [self.rows[thoughts][i] for i in staying]
        return self.rows[thoughts]

    def logprobs(self, emitted: Emitted, wanted: list[int | None]) -> list[TokenLogprob | None]:
        """Log-probabilities for the rows that asked, from the prediction before temperature and top-k/top-p."""
        rows = [i for i, n in enumerate(wanted) if n is not None]
        if not rows:
            return [None] * len(wanted)
        ops = self.model.ops
        z = ops.to_numpy(ops.take(emitted.logits, ops.asarray(np.array(rows)), axis=0)).astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        out: list[TokenLogprob | None] = [None] * len(wanted)
        for j, i in enumerate(rows):
            n = min(int(wanted[i] or 0), MAX_TOP_LOGPROBS)
            best = np.argsort(-lp[j])[:n]
            token = int(emitted.tokens[i])
            out[i] = TokenLogprob(token, float(lp[j, token]), [(int(t), float(lp[j, t])) for t in best])
        return out
