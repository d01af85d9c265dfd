"""The real-model study's instrument (qstar/core/heldout.py, benchmarks/real_effect.py) on tiny checkpoints: the hard
tokens it scores are exactly GSM8K's final answer and the toy corpus's answers; an untrained conversion's NLL with
thoughts equals the one without to the last bit; a trained mixing head moves it; the content control is the same
computation with other thoughts; the `plain` view leaves out exactly GSM8K's calculator-annotation markers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import ROOT

import qstar
from qstar.core import heldout

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_effect  # noqa: E402 - the study's script

GSM8K_STYLE = "Q: Tom has 3 bags of 7 apples. How many?\nA: 3 * 7 = 21 apples.\n#### 21"
TOY = "2:dje=|74_|4.\n5:ce=4."


def hard_text(model: qstar.QStarModel, scored: heldout.Scored) -> str:
    """The text of the tokens scored as hard (position t predicts token t + 1)."""
    return "".join(model.tokenizer.decode([scored.ids[t + 1]]) for t in np.flatnonzero(scored.hard))


def test_the_hard_tokens_are_the_final_answers(llama_checkpoint):
    m = qstar.load(str(llama_checkpoint), backend="torch")
    gsm8k, toy = heldout.score(m, [GSM8K_STYLE, TOY])
    assert hard_text(m, gsm8k) == "21"
    assert hard_text(m, toy) == "44"  # the toy corpus marks each document's answer digit
    cut = heldout.score(m, [GSM8K_STYLE], max_tokens=10)[0]  # a long document keeps its end, where the answer is
    assert len(cut.ids) == 10 and hard_text(m, cut) == "21"


def test_an_untrained_conversion_gains_exactly_nothing(llama_checkpoint):
    m = qstar.load(str(llama_checkpoint), backend="torch")  # a plain HF checkpoint: the mixing head starts at zero
    scores = heldout.score(m, [GSM8K_STYLE, TOY], seed=3)
    for s in scores:
        assert np.array_equal(s.nll_base, s.nll_talk) and not s.weight.any()
    result = heldout.summary(scores)
    assert all(result[view]["gain"] == 0.0 for view in ("all", "hard", "hardest"))


def test_a_mixing_head_moves_it_and_the_control_keeps_the_computation(mixing_checkpoint):
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    sampled = heldout.score(m, [GSM8K_STYLE], seed=0)[0]
    assert not np.array_equal(sampled.nll_base, sampled.nll_talk)
    again = heldout.score(m, [GSM8K_STYLE], seed=0)[0]
    assert np.array_equal(again.nll_talk, sampled.nll_talk)  # seeded: the same numbers every time
    for control in ("random", "fixed"):
        other = heldout.score(m, [GSM8K_STYLE], seed=0, control=control)[0]
        assert np.array_equal(other.nll_base, sampled.nll_base)  # the plain prediction is untouched
        assert not np.array_equal(other.thoughts, sampled.thoughts)
        thoughts = heldout.control_thoughts(m, len(other.ids), control, seed=0)  # what it gave the model
        given = m.next_token_logits(np.array([other.ids]), thoughts=thoughts)
        np.testing.assert_allclose(heldout.token_nll(given.mixed[0, :-1], np.array(other.ids[1:])), other.nll_talk)
    with pytest.raises(ValueError, match="unknown control"):
        heldout.score(m, [GSM8K_STYLE], control="shuffled")


def test_the_plain_view_leaves_out_gsm8k_calculator_annotations(mixing_checkpoint):
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    scored = heldout.score(m, ["Q: 3 bags of 7?\nA: 3 * 7 = <<3*7=21>>21 apples.\n#### 21"], seed=0)[0]
    markers = real_effect.annotation_markers(m, scored.ids)
    marked = "".join(m.tokenizer.decode([scored.ids[t + 1]]) for t in np.flatnonzero(markers))
    assert "<<" in marked and ">>" in marked and not any(c.isalpha() for c in marked)
    result = heldout.summary([scored], more={"plain": [~markers]})
    kept = ~markers
    assert result["plain"]["tokens"] == kept.sum()
    assert np.isclose(result["plain"]["gain"], (scored.nll_base - scored.nll_talk)[kept].mean())


def test_clean_text_has_no_calculator_annotations_and_keeps_the_rest(tmp_path):
    record = {"question": "3 bags of 7?", "answer": "3 * 7 = <<3*7=21>>21 apples.\n#### 21", "id": 5}
    (tmp_path / "split.jsonl").write_text(json.dumps(record) + "\n")
    split, clean = tmp_path / "split.jsonl", tmp_path / "clean.jsonl"
    real_effect.write_clean(split, clean)
    assert json.loads(clean.read_text()) == {**record, "answer": "3 * 7 = 21 apples.\n#### 21"}
    assert real_effect.documents(clean, 1) == real_effect.documents(split, 1, clean=True)


def test_a_part_of_the_set_scores_as_it_does_in_the_whole(mixing_checkpoint, tmp_path):
    """--skip: problem n draws its thoughts with seed + n whether scored in the whole set or in a part."""
    records = [{"question": f"{n} bags of 7?", "answer": f"{n} * 7 = {7 * n} apples.\n#### {7 * n}"} for n in range(3)]
    (tmp_path / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    whole = real_effect.measure(str(mixing_checkpoint), None, tmp_path / "split.jsonl", count=3, seed=4)
    part = real_effect.measure(str(mixing_checkpoint), None, tmp_path / "split.jsonl", count=3, seed=4, skip=1)
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    expected = heldout.score(m, real_effect.documents(tmp_path / "split.jsonl", 3), seed=4)[1:]
    assert part["documents"] == 2 and whole["documents"] == 3
    assert np.isclose(part["all"]["nll_talk"], np.concatenate([s.nll_talk for s in expected]).mean())
