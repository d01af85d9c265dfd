"""Answers: GSM8K gold, what a generation answered, and the scores.

Extraction follows zero-shot CoT (Kojima et al. 2022), as the Quiet-STaR paper evaluates: after the reasoning,
an answer trigger ("Therefore, the answer (arabic numerals) is") is appended and the model continues; the
FIRST number (or choice letter) of that continuation is its answer. Answers are canonical strings ("1000",
"3.5", "-2", "B") so that they can be counted, compared and written to JSON as they are.

Scores, per question with K samples (answers extracted from each):
- pass@1: the share of the K samples that are correct, i.e. the unbiased estimate of the chance that one
  sample is correct (with K = 1, plain accuracy); the dataset value is the mean over questions;
- cot-maj@K: 1 when the majority answer of the K samples is correct; the dataset value is the mean.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

# A minus sign (ASCII or U+2212) that does not follow a word character ("3-4" is 3, then 4), "$" on either side of
# it, then "1,000,000" (commas only as thousands separators), "12", "3.50" or ".5". A trailing "." is no decimal.
_NUMBER = re.compile(
    r"(?:(?<!\w)(?P<sign>[-\u2212])\$?|\$(?P<sign2>[-\u2212])?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
)
# A choice letter standing alone: "B", "(B)", "B)", "B." or "b)" / "(b)"; a lone lowercase "a" is an article.
_CHOICE = re.compile(r"(?<![A-Za-z])(?:\((?P<paren>[A-Za-z])\)|(?P<close>[A-Za-z])\)|(?P<bare>[A-Z]))(?![A-Za-z])")


def canonical_number(text: str) -> str | None:
    """The canonical form of one number written in `text` ("$1,000.50" -> "1000.5", "7.0" -> "7"), None if none.

    Integral values have no decimal point, so that "7.0" and "7" compare (and vote) as the same answer.
    """
    text = text.strip()
    match = _first_number(text)
    if match is None or match.start() != 0 or text[match.end() :].strip() not in ("", ".", "%"):
        return None
    return _canonical(match)


def extract_number(continuation: str) -> str | None:
    """The first number of the text the model wrote after the answer trigger, canonical; None if it has none."""
    match = _first_number(continuation)
    return None if match is None else _canonical(match)


def extract_choice(continuation: str, letters: str = "ABCDE") -> str | None:
    """The first stand-alone choice letter of the continuation ("B", "(B)", "b)"), upper case; None if none.

    Capitals inside words ("Because") do not count, and lowercase letters only in "(b)" / "b)" form, so that
    the article "a" is not read as choice A.
    """
    for match in _CHOICE.finditer(continuation):
        letter = (match.group("paren") or match.group("close") or match.group("bare")).upper()
        if letter in letters:
            return letter
    return None


def gsm8k_gold(answer: str) -> str:
    """The canonical number after "####" in a GSM8K `answer` field (its worked solution ends "#### 1,000")."""
    if "####" not in answer:
        raise ValueError("no '####' in the answer: not GSM8K's answer format")
    gold = canonical_number(answer.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError(f"no number after '####': {answer.rsplit('####', 1)[1].strip()!r}")
    return gold


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numbers compare by value ("3.50" == "3.5"), anything else case-insensitively; None is never correct."""
    if predicted is None:
        return False
    a, b = canonical_number(predicted), canonical_number(gold)
    if a is not None and b is not None:
        return a == b
    return predicted.strip().upper() == gold.strip().upper()


def majority_vote(answers: Sequence[str | None], count_none: bool = False) -> str | None:
    """The most frequent answer, None votes ignored unless `count_none` (the authors' Counter counts them, so "no
    answer" can win); a tie goes to the answer seen first. None if all are None."""
    counts = Counter(a for a in answers if a is not None or count_none)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if (a is not None or count_none) and counts[a] == top)


@dataclass(frozen=True)
class VoteScore:
    """What K samples of one question scored."""

    answers: list[str | None]
    """Per sample, the extracted answer (None: it gave none)."""
    gold: str
    """The gold answer they were compared with."""
    votes: dict[str, int]
    """Answer -> number of samples that gave it (None votes left out), most frequent first."""
    prediction: str | None
    """The majority answer (see majority_vote)."""
    correct: bool
    """The majority answer is correct: this question's cot-maj@K."""
    pass1: float
    """Share of the samples that are correct: this question's pass@1."""


def score_votes(
    answers: Sequence[str | None],
    gold: str,
    match: Callable[[str | None, str], bool] = answers_match,
    count_none: bool = False,
) -> VoteScore:
    """Score the extracted answers of one question's K samples against its gold answer."""
    if not answers:
        raise ValueError("no answers to score: each question needs at least one sample")
    prediction = majority_vote(answers, count_none)
    counts = Counter(a for a in answers if a is not None)
    votes = {a: counts[a] for a in sorted(counts, key=lambda a: (-counts[a], answers.index(a)))}
    pass1 = sum(match(a, gold) for a in answers) / len(answers)
    return VoteScore(list(answers), gold, votes, prediction, match(prediction, gold), pass1)


def _first_number(text: str) -> re.Match[str] | None:
    for match in _NUMBER.finditer(text):
        if match.group("int") or match.group("frac"):
            return match
    return None


def _canonical(match: re.Match[str]) -> str:
    digits = (match.group("int") or "0").replace(",", "") + (match.group("frac") or "")
    value = Decimal(digits)
    if match.group("sign") or match.group("sign2"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")
