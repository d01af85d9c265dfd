"""How varied the held-out thoughts are (session.thought_diversity): a collapse to one string, pause tokens rather than
thoughts, reads as 1 distinct thought a position, entropy 0 and one string everywhere; `qstar train` says so once."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from qstar.core.session import positions_thoughts, thought_diversity


def test_identical_thoughts_are_one_distinct_string_of_entropy_zero():
    same = np.tile(np.array([8, 93, 93, 93]), (10, 2, 1))  # 10 positions, P = 2 alike, the same string everywhere
    stats = thought_diversity([same[:4], same[4:]], per_position=2)
    assert stats == {"thought_distinct": 0.5, "thought_entropy": 0.0, "thought_mode": 1.0}


def test_varied_thoughts():
    rng = np.random.default_rng(0)
    varied = rng.integers(0, 1000, size=(50, 2, 4))
    stats = thought_diversity([varied], per_position=2)
    assert stats["thought_distinct"] == 1.0 and stats["thought_mode"] == 1 / 100
    assert abs(stats["thought_entropy"] - np.log(100)) < 0.2  # ~100 different tokens at each step
    half = varied.copy()
    half[:, 1] = half[:, 0]  # the two thoughts of each position alike, positions still differ
    assert thought_diversity([half], per_position=2)["thought_distinct"] == 0.5


def test_only_the_real_positions_count_and_each_position_keeps_its_thoughts_together():
    B, P, S, k = 2, 2, 3, 2
    thoughts = np.arange(B * P * S * k).reshape(B * P, S, k)  # rows b0p0, b0p1, b1p0, b1p1
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    got = positions_thoughts(thoughts, np.array([0, 1, 3]), mask)
    assert got.shape == (5, P, k)  # row 0: streams 0, 1, 3 are real; row 1: streams 0, 1
    np.testing.assert_array_equal(got[0], thoughts[[0, 1], 0])
    np.testing.assert_array_equal(got[2], thoughts[[0, 1], 2])
    np.testing.assert_array_equal(got[4], thoughts[[2, 3], 1])


def test_training_warns_once_when_the_thoughts_collapse(monkeypatch, tmp_path):
    from qstar.cli.main import app
    from qstar.core import trainer

    real = trainer.evaluate

    def collapsed(*args, **kwargs):
        return real(*args, **kwargs) | {"thought_distinct": 0.5, "thought_entropy": 0.0, "thought_mode": 1.0}

    monkeypatch.setattr(trainer, "evaluate", collapsed)
    args = ["train", "--iters", "2", "--warmup-steps", "1", "--steps-per-eval", "1", "--val-batches", "1"]
    result = CliRunner().invoke(app, [*args, "--max-seq-length", "16", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "the thoughts have collapsed" in line]
    assert len(warnings) == 1 and "100%" in warnings[0], result.output
    assert "the commonest thought 100%" in result.output
