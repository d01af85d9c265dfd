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
    documents = [GSM8K_STYLE, "Q: 4 bags of 2?\nA: 4 * 2 = 8.\n#### 8"]
    sampled = heldout.score(m, documents, seed=0)
    assert not np.array_equal(sampled[0].nll_base, sampled[0].nll_talk)
    again = heldout.score(m, documents, seed=0)
    # seeded: the same numbers every time
    assert all(np.array_equal(a.nll_talk, s.nll_talk) for a, s in zip(again, sampled, strict=True))
    for control in ("random", "fixed", "shuffled", "perturbed", "perturbed_last"):
        other = heldout.score(m, documents, seed=0, control=control)
        for n, (o, s) in enumerate(zip(other, sampled, strict=True)):
            assert np.array_equal(o.nll_base, s.nll_base)  # the plain prediction is untouched
            assert not np.array_equal(o.thoughts, s.thoughts), control
            given = m.next_token_logits(
                np.array([o.ids]), thoughts=o.thoughts[None], positions=np.arange(len(o.ids) - 1)
            )
            np.testing.assert_allclose(heldout.token_nll(given.mixed[0], np.array(o.ids[1:])), o.nll_talk, rtol=1e-6)
            if control == "shuffled":  # the next document's own thoughts, position by position (cycled)
                mine, theirs = s.thoughts, sampled[(n + 1) % 2].thoughts
                assert np.array_equal(o.thoughts, theirs[np.arange(len(mine)) % len(theirs)])
            if control.startswith("perturbed"):  # its own thoughts, the first (last) digit of each moved on by one
                numbers = heldout.number_tokens(m)
                assert np.array_equal(o.thoughts, heldout.perturbed(s.thoughts, numbers, control == "perturbed_last"))
                assert {m.decode([a]): m.decode([b]) for a, b in numbers.items()} == {
                    str(d): str((d + 1) % 10) for d in range(10)
                }
    with pytest.raises(ValueError, match="unknown control"):
        heldout.score(m, [GSM8K_STYLE], control="bogus")


def test_perturbed_changes_the_first_or_the_last_number_of_a_thought():
    numbers = {1: 2, 2: 3, 3: 1}  # token id -> the id of the next number
    thoughts = np.array([[7, 1, 8, 2], [3, 9, 9, 9], [7, 8, 9, 9]])
    first = heldout.perturbed(thoughts, numbers)
    last = heldout.perturbed(thoughts, numbers, last=True)
    assert first.tolist() == [[7, 2, 8, 2], [1, 9, 9, 9], [7, 8, 9, 9]]
    assert last.tolist() == [[7, 1, 8, 3], [1, 9, 9, 9], [7, 8, 9, 9]]


def test_thinking_only_where_the_hard_tokens_are_predicted_gives_their_numbers(mixing_checkpoint):
    """hard_only: the answer tokens get the very thoughts and NLL of thinking everywhere (keyed noise), in any batch;
    every other token is predicted without a thought."""
    m = qstar.load(str(mixing_checkpoint), backend="torch")
    documents = [GSM8K_STYLE, TOY, "no answer here", GSM8K_STYLE.replace("21", "24")]
    everywhere = heldout.score(m, documents, seed=2, batch_size=1)
    for batch_size in (1, 4):
        only = heldout.score(m, documents, seed=2, hard_only=True, batch_size=batch_size)
        for e, o in zip(everywhere, only, strict=True):
            np.testing.assert_allclose(o.nll_talk[e.hard], e.nll_talk[e.hard], rtol=1e-6)
            assert np.array_equal(o.thoughts[e.hard], e.thoughts[e.hard])
            assert np.array_equal(o.nll_talk[~e.hard], o.nll_base[~e.hard]) and not o.weight[~e.hard].any()
        np.testing.assert_allclose(
            heldout.score(m, documents, seed=2, batch_size=batch_size)[1].nll_talk, everywhere[1].nll_talk, rtol=1e-6
        )


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
