"""What an evaluation writes: one JSONL record per question (so that a killed run resumes), then a results JSON.

The records file is appended one flushed line per question; a kill can leave at most a partial last line, which
`read_records` ignores and `RecordWriter` cuts off before appending, so that question is simply done again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from qstar.core.eval.answers import score_votes
from qstar.core.files import write_atomic


@dataclass(frozen=True)
class QuestionRecord:
    index: int
    """The question's Example.index."""
    prompt: str
    generations: list[str]
    """Per sample, everything the model wrote after the prompt (reasoning, answer trigger, continuation)."""
    answers: list[str | None]
    """Per sample, the extracted answer (None: it gave none)."""
    gold: str
    votes: dict[str, int]
    prediction: str | None
    """The majority answer."""
    correct: bool
    """The majority answer is correct (cot-maj@K; with one sample, plain accuracy)."""
    pass1: float
    """Share of the samples that are correct."""

    @classmethod
    def scored(
        cls, index: int, prompt: str, generations: Sequence[str], answers: Sequence[str | None], gold: str
    ) -> QuestionRecord:
        """The record of one question, its votes and scores computed from the extracted answers."""
        if len(generations) != len(answers):
            raise ValueError(f"{len(generations)} generations but {len(answers)} answers: one answer per sample")
        score = score_votes(answers, gold)
        return cls(
            index,
            prompt,
            list(generations),
            list(answers),
            gold,
            score.votes,
            score.prediction,
            score.correct,
            score.pass1,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuestionRecord:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"a record needs exactly the fields {sorted(names)}; got {sorted(data)}")
        return cls(**data)


class RecordWriter:
    """Appends QuestionRecords to a JSONL file, each line flushed as soon as it is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: QuestionRecord) -> None:
        self._handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def read_records(path: str | Path) -> dict[int, QuestionRecord]:
    """The questions already done, by index; {} when there is no file yet. A partial last line is ignored."""
    path = Path(path)
    if not path.exists():
        return {}
    records: dict[int, QuestionRecord] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                break  # cut by a kill mid-write: that question is redone
            if not line.strip():
                continue
            try:
                record = QuestionRecord.from_dict(json.loads(line))
            except (ValueError, TypeError) as error:
                message = f"{path}:{number}: not a question record ({error}); remove the file to start over"
                raise ValueError(message) from error
            records[record.index] = record
    return records


@dataclass(frozen=True)
class EvalResult:
    task: str
    metric: str
    """The headline metric: cot-maj@K with K > 1 samples a question, else pass@1."""
    value: float
    n: int
    """Questions scored."""
    model: str
    thoughts: bool
    """Whether the model thought (Quiet-STaR thoughts on) while generating."""
    settings: dict[str, Any]
    """Everything else that decides the number (votes, data, limit, sampling settings...)."""
    metrics: dict[str, float]
    """Every metric computed: pass@1, and cot-maj@K when K > 1."""


def summarize(
    records: Iterable[QuestionRecord], task: str, model: str, thoughts: bool, settings: dict[str, Any]
) -> EvalResult:
    """The dataset scores of the records: pass@1 and cot-maj@K are means over questions (see answers.py)."""
    done = list(records)
    if not done:
        raise ValueError("no question records to summarize")
    samples = {len(r.answers) for r in done}
    if len(samples) != 1:
        raise ValueError(f"records with different numbers of samples {sorted(samples)}: resumed with other --votes?")
    k = samples.pop()
    metrics = {"pass@1": sum(r.pass1 for r in done) / len(done)}
    if k > 1:
        metrics[f"cot-maj@{k}"] = sum(r.correct for r in done) / len(done)
    metric = f"cot-maj@{k}" if k > 1 else "pass@1"
    return EvalResult(task, metric, metrics[metric], len(done), model, thoughts, dict(settings), metrics)


def write_results(path: str | Path, result: EvalResult) -> None:
    """Write the results JSON in one rename, so that a reader never sees half a file."""
    write_atomic(path, json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")


def read_results(path: str | Path) -> EvalResult:
    return EvalResult(**json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass
class RunningAccuracy:
    """The headline accuracy so far, for a progress bar ("acc 61.3% (49/80)")."""

    correct: int = 0
    n: int = 0

    @classmethod
    def of(cls, records: Iterable[QuestionRecord]) -> RunningAccuracy:
        """Start from the records of a resumed run."""
        running = cls()
        for record in records:
            running.add(record.correct)
        return running

    def add(self, correct: bool) -> None:
        self.correct += int(correct)
        self.n += 1

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def __str__(self) -> str:
        return f"acc {100 * self.value:.1f}% ({self.correct}/{self.n})"


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a kill left without its newline (read_records ignores it too)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
