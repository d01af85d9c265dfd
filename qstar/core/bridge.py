"""The bridge world: the toy's design (qstar/core/synthetic.py) in natural language, for a real pretrained model.

A problem starts at a number and applies three steps to it, each keeping the value within zero..nine; a document
states the problem and its answer, in one of two forms that nothing tells apart before the answer:

    hidden:  Start at eight, subtract five, add one, double it. The result is eight.
    worked:  Start at eight, subtract five, add one, double it. The result is — three, four, eight — eight.

Numbers are words, so that every value is one token of a BPE vocabulary (SmolLM2's: ` three`), and the worked
form writes the values after each step between two dashes right where the hidden form gives the answer: a thought
whose <start> and <end> start as ` —` (the recipe's init_token) continues a hidden document as a worked one, holds
the values, and is followed by the answer as the worked field is. The field holds STEPS values of one token each,
so a thought of 2 * STEPS - 1 tokens (` three`, `,`, ` four`, `,`, ` eight`) ends where the field does.

The answer of a hidden document needs STEPS operations in one forward pass; a short plain fine-tune on both forms
(docs/REAL.md) teaches SmolLM2-135M to write the field right most of the time but not to answer hidden documents.

Hard tokens: the answer word (`hard_mask`), the only token of a hidden document that thinking can help.
Splits: a problem belongs to exactly one of "pretrain" (the plain fine-tune on both forms), "train" (Quiet-STaR)
and "validation" by a fixed hash of its text (`split_of`), whatever its form and the seed, as in the toy.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterator

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STEPS = 3
"""Operations per problem, and the values a worked field holds."""
SPLITS = ("pretrain", "train", "validation")
BUCKETS = {"validation": range(0, 1), "train": range(1, 3), "pretrain": range(3, 10)}
"""split -> the buckets of crc32(problem) % 10 it owns: 10% validation, 20% Quiet-STaR training, 70% the plain
fine-tune."""
PRETRAIN_WORKED = 0.5
"""Share of worked documents in the pretraining split."""
ANSWER_INTRO = ". The result is"
_WORD = "|".join(NUMBERS)
STEP = re.compile(rf"(add|subtract) ({_WORD})|(double|halve) it")
DOCUMENT = re.compile(
    rf"Start at ({_WORD}), ((?:(?:add|subtract) (?:{_WORD})|(?:double|halve) it)(?:, (?:(?:add|subtract) "
    rf"(?:{_WORD})|(?:double|halve) it))*)\. The result is(?: — ((?:{_WORD})(?:, (?:{_WORD}))*) —)? ({_WORD})\."
)


def apply(value: int, step: str) -> int:
    """The value after one step (`add five`, `subtract two`, `double it`, `halve it`)."""
    match = STEP.fullmatch(step)
    if match is None:
        raise ValueError(f"not a step of the bridge world: {step!r}")
    if match[1]:
        amount = NUMBERS.index(match[2])
        return value + amount if match[1] == "add" else value - amount
    return value * 2 if match[3] == "double" else value // 2


def values(start: int, steps: list[str]) -> list[int]:
    """The value after each step; the last one is the answer."""
    out = []
    for step in steps:
        start = apply(start, step)
        out.append(start)
    return out


def next_step(rng: random.Random, value: int) -> str:
    """A random step that keeps the value a whole number within zero..nine."""
    while True:
        kind = rng.choice(("add", "subtract", "double", "halve"))
        if kind in ("double", "halve"):
            if value > 0 and (value <= 4 if kind == "double" else value % 2 == 0):
                return f"{kind} it"
            continue
        amount = rng.randint(1, 9)
        if 0 <= (value + amount if kind == "add" else value - amount) <= 9:
            return f"{kind} {NUMBERS[amount]}"


def render(start: int, steps: list[str], worked: bool) -> str:
    trace = values(start, steps)
    field = f" — {', '.join(NUMBERS[v] for v in trace)} —" if worked else ""
    return f"Start at {NUMBERS[start]}, {', '.join(steps)}{ANSWER_INTRO}{field} {NUMBERS[trace[-1]]}."


def parse(document: str) -> tuple[int, list[str], bool]:
    """(start, steps, worked?) of a document."""
    match = DOCUMENT.fullmatch(document)
    if match is None:
        raise ValueError(f"not a document of the bridge world: {document!r}")
    return NUMBERS.index(match[1]), match[2].split(", "), match[3] is not None


def split_of(document: str) -> str:
    """The split a document's problem belongs to (the same for its hidden and worked forms)."""
    start, steps, _ = parse(document)
    bucket = zlib.crc32(f"{start}:{','.join(steps)}".encode()) % 10
    return next(name for name, owned in BUCKETS.items() if bucket in owned)


def intermediates(document: str) -> list[str]:
    """The values a hidden document does not show before its answer, as words."""
    start, steps, _ = parse(document)
    return [NUMBERS[v] for v in values(start, steps)[:-1]]


def answer(document: str) -> str:
    return NUMBERS[values(*parse(document)[:2])[-1]]


def hard_mask(text: str) -> list[bool]:
    """Per character of any text: True for the answer word of every document of this world in it (the word, not the
    space before it)."""
    mask = [False] * len(text)
    for match in DOCUMENT.finditer(text):
        mask[match.start(4) : match.end(4)] = [True] * (match.end(4) - match.start(4))
    return mask


def documents(seed: int, split: str = "train", worked: float | None = None) -> Iterator[str]:
    """An endless, seeded stream of documents of one split; `worked` is the share of worked documents (default:
    PRETRAIN_WORKED for "pretrain", 0 otherwise)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    share = (PRETRAIN_WORKED if split == "pretrain" else 0.0) if worked is None else worked
    rng = random.Random(f"bridge:{split}:{seed}")
    while True:
        start = rng.randrange(10)
        steps, value = [], start
        for _ in range(STEPS):
            steps.append(next_step(rng, value))
            value = apply(value, steps[-1])
        document = render(start, steps, rng.random() < share)
        if split_of(document) == split:
            yield document


def generate_documents(count: int, seed: int, split: str = "train", worked: float | None = None) -> list[str]:
    """The first `count` documents of `documents(seed, split, worked)`."""
    stream = documents(seed, split, worked)
    return [next(stream) for _ in range(count)]
