"""Answer extraction and scoring of zero-shot CoT generations."""

from __future__ import annotations

import pytest

from qstar.core.eval.answers import (
    answers_match,
    canonical_number,
    extract_choice,
    extract_number,
    gsm8k_gold,
    majority_vote,
    score_votes,
)


@pytest.mark.parametrize(
    "continuation,expected",
    [
        (" 18.", "18"),
        (" 1,000 apples", "1000"),
        (" $1,234,567.80 in total", "1234567.8"),
        (" $18.", "18"),
        (" -5 degrees.", "-5"),
        (" $-3.50", "-3.5"),
        (" -$2", "-2"),
        (" \u22127", "-7"),
        (" 3.50", "3.5"),
        (" 7.0.", "7"),
        (" 42.\n\nQ: next question 17", "42"),
        (" 50%.", "50"),
        (" .5 of it", "0.5"),
        (" 3-4 hours", "3"),
        (" 12,34", "12"),
        (" 0.25 and 9", "0.25"),
        (" not known", None),
        ("", None),
    ],
)
def test_first_number_of_the_continuation(continuation, expected):
    assert extract_number(continuation) == expected


@pytest.mark.parametrize(
    "text,expected",
    [(" $1,000.50 ", "1000.5"), ("7.0", "7"), ("-0", "0"), ("100", "100"), ("42.", "42"), ("18 dollars", None)],
)
def test_canonical_number_of_one_number(text, expected):
    assert canonical_number(text) == expected


@pytest.mark.parametrize(
    "continuation,expected",
    [
        (" (B).", "B"),
        (" B", "B"),
        (" b) ball", "B"),
        (" (c) because", "C"),
        (" E. The others are wrong.", "E"),
        (" a dog, so (D)", "D"),
        (" Because of C", "C"),
        (" F, then A", "A"),
        (" none of them", None),
        (" a tree", None),
    ],
)
def test_first_choice_letter(continuation, expected):
    assert extract_choice(continuation) == expected


def test_gsm8k_gold_is_the_number_after_the_marks():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,000") == "1000"
    assert gsm8k_gold("... #### $-2.50") == "-2.5"
    with pytest.raises(ValueError, match="no '####'"):
        gsm8k_gold("18")
    with pytest.raises(ValueError, match="no number after"):
        gsm8k_gold("#### eighteen")


def test_answers_match_numerically_or_by_letter():
    assert answers_match("3.50", "3.5") and answers_match("7", "7.0") and answers_match("b", "B")
    assert not answers_match(None, "7") and not answers_match("8", "7") and not answers_match("A", "B")


def test_majority_vote_ignores_none_and_breaks_ties_by_first_seen():
    assert majority_vote(["4", None, "3", "3", None, None]) == "3"
    assert majority_vote(["4", "3", "3", "4"]) == "4"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_score_votes_pass1_is_the_share_of_correct_samples():
    score = score_votes(["3", "4", None, "4", "3.0"], "3")
    assert score.pass1 == pytest.approx(0.4)
    assert list(score.votes.items()) == [("4", 2), ("3", 1), ("3.0", 1)]
    assert score.prediction == "4" and not score.correct
    tie = score_votes(["3", "4", "4", "3"], "3")
    assert tie.prediction == "3" and tie.correct and tie.pass1 == 0.5 and list(tie.votes) == ["3", "4"]
    nothing = score_votes([None, None], "3")
    assert nothing.prediction is None and nothing.votes == {} and not nothing.correct and nothing.pass1 == 0
    with pytest.raises(ValueError, match="at least one sample"):
        score_votes([], "3")
