"""Evaluation protocols: every setting that decides a zero-shot chain-of-thought number, fixed in one place.

- `qstar` (the default): greedy reasoning of up to 256 tokens cut at the next "\\nQ:", the answer trigger after a
  space, 16 greedy answer tokens cut at a newline, qstar's extraction (the first number, canonical).
- `paper`: the Quiet-STaR authors' `zero-shotcot-eval.py`: the GSM8K test set shuffled with seed 42 and its first 128
  questions, 8 votes at temperature 0.9 (reasoning and answer alike), the reasoning ended by the first "Q:" the model
  writes (or its second "\\n\\n\\n"), the trigger after `rstrip()` and a newline, the authors' extraction (commas
  removed, the first integer; a vote of no number counts, as their Counter does) and, beside it, qstar's.
  Their loop samples the reasoning tokens 0..384 before it switches to the answer and stops 13 tokens after that:
  385 and 13 tokens.

lm-evaluation-harness's tasks (its gsm8k_cot_zeroshot among them) run through the harness itself, with qstar as its
model: qstar/core/eval/harness.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from qstar.core.eval.answers import answers_match, extract_number
from qstar.core.eval.tasks import TASKS, Example, Task

GSM8K_TRIGGER = TASKS["gsm8k"].answer_trigger


@dataclass(frozen=True)
class Sample:
    """What one sample of a question produced."""

    reasoning: str
    """The reasoning, cut where the protocol ends it."""
    answer_prompt: str
    """The text the answer step continued ("" without an answer step)."""
    continuation: str
    """What the answer step wrote ("" without one)."""


@dataclass(frozen=True)
class Extraction:
    """One way to read the answer of a sample and compare it with the gold one."""

    name: str
    extract: Callable[[Sample], str | None]
    gold: Callable[[Example], str]
    """The gold answer to compare with, from the question (its reference: GSM8K's worked solution ending "#### N")."""
    match: Callable[[str | None, str], bool]
    votes_without_answer: bool = False
    """Whether a sample without an answer takes part in the majority vote (the authors' Counter counts None)."""


@dataclass(frozen=True)
class Protocol:
    name: str
    votes: int
    temperature: float
    max_tokens: int
    """Reasoning tokens at most."""
    answer_tokens: int
    """Answer tokens at most; 0: no answer step, the answer is read from the reasoning."""
    stops: tuple[str, ...]
    """Where a reasoning ends (generation stops, the text is cut before it)."""
    answer_stops: tuple[str, ...]
    extractions: tuple[Extraction, ...]
    """The headline first; none: the task's own (task.extract on the answer step's continuation)."""
    tasks: tuple[str, ...] = tuple(TASKS)
    """The tasks it is defined for."""
    trigger_separator: str = " "
    """Between the reasoning (trailing whitespace removed) and the answer trigger."""
    sampled_answer: bool = False
    """The answer step samples at the reasoning's temperature (else it is greedy)."""
    end_reasoning: Callable[[str], str] = lambda text: text
    """A further cut of the reasoning after generation (the paper's second "\\n\\n\\n")."""
    shuffle_seed: int | None = None
    """Questions in the order of numpy's default_rng(seed).permutation (Hugging Face datasets' shuffle), or as given."""
    limit: int | None = None
    """The first N questions (after the shuffle)."""


def first_integer(text: str) -> str | None:
    """The authors' extract_first_integer: the first run of digits once commas are removed (no sign, no decimals)."""
    match = re.search(r"\d+", text.replace(",", ""))
    return None if match is None else str(int(match.group()))


def after_trigger(trigger: str) -> Callable[[Sample], str]:
    """The authors' reading: everything after the last occurrence of the trigger in the whole decoded text."""
    return lambda s: (s.answer_prompt + s.continuation).split(trigger)[-1]


def second_triple_newline(text: str) -> str:
    """The paper's other end of a reasoning: a second "\\n\\n\\n" (the text is cut before it)."""
    first = text.find("\n\n\n")
    second = -1 if first < 0 else text.find("\n\n\n", first + 3)
    return text if second < 0 else text[:second]


def extractions(protocol: Protocol, task: Task) -> tuple[Extraction, ...]:
    """How `protocol` reads the answers of `task`, the headline first."""
    if task.name not in protocol.tasks:
        raise ValueError(f"--protocol {protocol.name} is defined for {', '.join(protocol.tasks)}, not {task.name}")
    if protocol.extractions:
        return protocol.extractions
    return (Extraction("qstar", lambda s: task.extract(s.continuation), lambda e: e.gold, answers_match),)


def authors_gold(example: Example) -> str:
    return str(first_integer(example.reference.split("#### ")[-1]))


PROTOCOLS: dict[str, Protocol] = {
    "qstar": Protocol(
        name="qstar",
        votes=1,
        temperature=0.0,
        max_tokens=256,
        answer_tokens=16,
        stops=("\nQ:",),
        answer_stops=("\n",),
        extractions=(),
    ),
    "paper": Protocol(
        name="paper",
        votes=8,
        temperature=0.9,
        max_tokens=385,
        answer_tokens=13,
        stops=("Q:",),
        answer_stops=("Q:",),
        extractions=(
            Extraction(
                "authors",
                lambda s: first_integer(after_trigger("\n" + GSM8K_TRIGGER)(s)),
                authors_gold,
                lambda predicted, gold: predicted is not None and predicted == gold,
                votes_without_answer=True,
            ),
            Extraction(
                "qstar",
                lambda s: extract_number(after_trigger("\n" + GSM8K_TRIGGER)(s)),
                lambda e: e.gold,
                answers_match,
            ),
        ),
        tasks=("gsm8k",),
        trigger_separator="\n",
        sampled_answer=True,
        end_reasoning=second_triple_newline,
        shuffle_seed=42,
        limit=128,
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown --protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
