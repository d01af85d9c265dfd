"""The evaluation protocols read answers exactly as their sources do: the authors' zero-shotcot-eval.py and
lm-evaluation-harness's tasks run through the harness itself (tests/cli/test_harness.py)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import require

from qstar.core.eval.answers import majority_vote, score_votes
from qstar.core.eval.protocols import (
    GSM8K_TRIGGER,
    PROTOCOLS,
    Sample,
    extractions,
    first_integer,
    second_triple_newline,
)
from qstar.core.eval.run import EvalSettings, select
from qstar.core.eval.tasks import TASKS, Example

GSM = Example(0, "How many?", "1000", "5 * 200 = 1,000\n#### 1,000")


def sample(reasoning: str = "", continuation: str = "") -> Sample:
    prompt = "Q: How many?\nA: Let's think step by step."
    return Sample(reasoning, f"{prompt}{reasoning.rstrip()}\n{GSM8K_TRIGGER}", continuation)


def test_the_authors_extraction_and_vote():
    assert first_integer(" 1,234 apples, then 5") == "1234"
    assert first_integer(" -3.75 dollars") == "3"  # no sign, no decimals: their regex is \d+
    assert first_integer(" none") is None
    authors, qstar = extractions(PROTOCOLS["paper"], TASKS["gsm8k"])
    assert (authors.name, qstar.name) == ("authors", "qstar")
    assert authors.gold(GSM) == "1000" and authors.extract(sample(" so 1000.", " 1,000 dollars.")) == "1000"
    # the text after the LAST trigger counts, as their split(final_answer_text)[-1] does
    assert authors.extract(sample("", f" 7.\n{GSM8K_TRIGGER} 9")) == "9"
    assert qstar.extract(sample("", " $1,000.")) == "1000"
    # their Counter counts "no number" as a vote, and it can win
    assert majority_vote(["3", None, None], count_none=True) is None
    assert majority_vote(["3", None, None]) == "3"
    score = score_votes(["1000", None, None], "1000", authors.match, authors.votes_without_answer)
    assert not score.correct and score.pass1 == pytest.approx(1 / 3)


def test_the_papers_reasoning_ends():
    assert second_triple_newline("a\n\n\nb\n\n\nc") == "a\n\n\nb"
    assert second_triple_newline("a\n\n\nb") == "a\n\n\nb"
    paper = PROTOCOLS["paper"]
    assert (paper.votes, paper.temperature, paper.max_tokens, paper.answer_tokens) == (8, 0.9, 385, 13)
    assert (paper.shuffle_seed, paper.limit, paper.stops, paper.trigger_separator) == (42, 128, ("Q:",), "\n")
    with pytest.raises(ValueError, match="defined for gsm8k, not csqa"):
        extractions(paper, TASKS["csqa"])


def test_the_paper_order_is_hugging_face_datasets_shuffle():
    datasets = require("datasets")
    examples = [Example(i, f"q{i}", "1", "#### 1") for i in range(1319)]
    hf = datasets.Dataset.from_dict({"i": list(range(1319))}).shuffle(seed=42)["i"]
    paper = select(examples, EvalSettings(protocol="paper"))
    assert [e.index for e in paper] == hf[:128]
    assert [e.index for e in select(examples, EvalSettings(protocol="paper", limit=3))] == hf[:3]
    assert [e.index for e in select(examples, EvalSettings())] == list(range(1319))
    assert np.array_equal(np.random.default_rng(42).permutation(1319)[:128], hf[:128])


def test_protocol_defaults_and_overrides():
    s = EvalSettings(protocol="paper", votes=2, max_tokens=16)
    assert (s.votes, s.temperature, s.max_tokens, s.answer_tokens, s.limit) == (2, 0.9, 16, 13, 128)
    with pytest.raises(ValueError, match="unknown --protocol 'nope'"):
        EvalSettings(protocol="nope")
    with pytest.raises(ValueError, match="--votes > 1 needs --temperature > 0"):
        EvalSettings(votes=2)
