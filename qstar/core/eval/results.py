"""What an evaluation writes: one JSONL record per question (so that a killed run resumes), then a results JSON.

The records file is appended one flushed line per question; a kill can leave at most a partial last line, which
`read_records` ignores and `RecordWriter` cuts off before appending, so that question is simply done again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from qstar.core.eval.answers import VoteScore
from qstar.core.files import write_atomic

HEADER = "evaluation"
"""The key of the first line of a records file: the task, protocol, settings, model and data it was made with."""


@dataclass(frozen=True)
class SampleInfo:
    """How one sample went: why its reasoning ended and how many tokens each part had."""

    stop: str
    """Why the reasoning ended: "eos", "stop" (the protocol's end marker), "max_tokens" or "context"."""
    prompt_tokens: int
    reasoning_tokens: int
    answer_tokens: int
    truncated: int = 0
    """Prompt tokens cut from the start of a prompt longer than the model's context (reasoning and answer steps)."""


@dataclass(frozen=True)
class QuestionRecord:
    index: int
    """The question's Example.index."""
    prompt: str
    generations: list[str]
    """Per sample, everything the model wrote after the prompt (reasoning, answer trigger, continuation)."""
    samples: list[SampleInfo]
    scores: dict[str, VoteScore]
    """Per way of reading the answers (the protocol's extractions), the headline first."""

    @property
    def headline(self) -> VoteScore:
        return next(iter(self.scores.values()))

    @property
    def correct(self) -> bool:
        """The headline majority answer is correct (cot-maj@K; with one sample, plain accuracy)."""
        return self.headline.correct

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuestionRecord:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"a record needs exactly the fields {sorted(names)}; got {sorted(data)}")
        samples = [SampleInfo(**s) for s in data["samples"]]
        scores = {name: VoteScore(**score) for name, score in data["scores"].items()}
        return cls(data["index"], data["prompt"], data["generations"], samples, scores)


class RecordWriter:
    """Appends QuestionRecords to a JSONL file, each line flushed as soon as it is written; a new file starts with the
    `header` line that says which evaluation the records belong to."""

    def __init__(self, path: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", encoding="utf-8")
        if fresh:
            self._handle.write(json.dumps({HEADER: header}, ensure_ascii=False) + "\n")
            self._handle.flush()

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


def read_records(path: str | Path) -> tuple[dict[str, Any] | None, dict[int, QuestionRecord]]:
    """The header and the questions already done, by index; (None, {}) when there is no file yet. A partial last line
    is ignored."""
    path = Path(path)
    if not path.exists():
        return None, {}
    header: dict[str, Any] | None = None
    records: dict[int, QuestionRecord] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                break  # cut by a kill mid-write: that question is redone
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if number == 1 and isinstance(data, dict) and set(data) == {HEADER}:
                    header = data[HEADER]
                    continue
                record = QuestionRecord.from_dict(data)
            except (ValueError, TypeError, KeyError) as error:
                message = f"{path}:{number}: not a question record ({error}); remove the file to start over"
                raise ValueError(message) from error
            records[record.index] = record
    return header, records


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
    """Everything else that decides the number (protocol, votes, data, limit, sampling settings...)."""
    metrics: dict[str, float]
    """Every metric computed: pass@1, and cot-maj@K when K > 1, per way of reading the answers (named in brackets
    when the protocol has more than one)."""
    counts: dict[str, Any]
    """How the samples went: their stop reasons, and how many prompts lost tokens to the context."""


def summarize(
    records: Iterable[QuestionRecord], task: str, model: str, thoughts: bool, settings: dict[str, Any]
) -> EvalResult:
    """The dataset scores of the records: pass@1 and cot-maj@K are means over questions (see answers.py)."""
    done = list(records)
    if not done:
        raise ValueError("no question records to summarize")
    samples = {len(r.samples) for r in done}
    if len(samples) != 1:
        raise ValueError(f"records with different numbers of samples {sorted(samples)}: resumed with other --votes?")
    k, names = samples.pop(), list(done[0].scores)
    metrics: dict[str, float] = {}
    for name in names:
        suffix = f" ({name})" if len(names) > 1 else ""
        metrics[f"pass@1{suffix}"] = sum(r.scores[name].pass1 for r in done) / len(done)
        if k > 1:
            metrics[f"cot-maj@{k}{suffix}"] = sum(r.scores[name].correct for r in done) / len(done)
    metric = f"{f'cot-maj@{k}' if k > 1 else 'pass@1'}{f' ({names[0]})' if len(names) > 1 else ''}"
    stops = Counter(s.stop for r in done for s in r.samples)
    counts = {
        "stops": dict(sorted(stops.items())),
        "truncated_prompts": sum(bool(s.truncated) for r in done for s in r.samples),
    }
    return EvalResult(task, metric, metrics[metric], len(done), model, thoughts, dict(settings), metrics, counts)


def write_results(path: str | Path, result: EvalResult) -> None:
    """Write the results JSON in one rename, so that a reader never sees half a file."""
    write_atomic(path, json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")


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
