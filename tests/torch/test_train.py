"""`qstar train` on PyTorch: the loss goes down, checkpoints load, and a killed run resumes bit-exactly."""

from __future__ import annotations

from helpers import (
    TRAIN_SMALL,
    killed_at_random_and_uninterrupted,
    mixing_head_only_training,
    no_thought_training,
    short_training,
    train_records,
)
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app


def test_short_training_lowers_the_loss_and_saves_a_loadable_model(llama_checkpoint, tmp_path):
    out = short_training("torch", llama_checkpoint, tmp_path)
    model = qstar.load(str(out / "model"), backend="torch")
    assert model.recipe.thought_tokens == 2 and model.recipe.policy_weight == 1


def test_training_only_the_mixing_head(llama_checkpoint, tmp_path):
    mixing_head_only_training("torch", llama_checkpoint, tmp_path)


def test_the_no_thought_twin_trains_the_language_model_alone(llama_checkpoint, tmp_path):
    no_thought_training("torch", llama_checkpoint, tmp_path)


def test_killed_run_resumes_exactly(llama_checkpoint, tmp_path):
    whole, broken = killed_at_random_and_uninterrupted("torch", llama_checkpoint, tmp_path)
    wa = qstar.load(str(whole / "model"), backend="torch").parameters()
    wb = qstar.load(str(broken / "model"), backend="torch").parameters()
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


def test_streamed_hub_data_is_tokenized_once(llama_checkpoint, tmp_path, monkeypatch, online):
    """A hub dataset (faked: no network here) goes through OUT/token-cache; a resumed run reads it from there."""
    import sys
    import types

    opened = []

    def load_dataset(name, config, split, streaming):
        opened.append(name)
        return [{"text": f"doc {i}: " + "ab" * (i % 7 + 3)} for i in range(400)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "run"
    args = [
        "train",
        "--backend",
        "torch",
        "--model",
        str(llama_checkpoint),
        "--data",
        "someone/corpus",
        "--out",
        str(out),
        "--iters",
        "4",
        "--save-every",
        "2",
        "--steps-per-eval",
        "4",
        *TRAIN_SMALL,
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert sorted(p.name.split("-")[0] for p in (out / "token-cache").iterdir()) == ["train", "validation"]
    streamed = len(opened)
    resumed = CliRunner().invoke(app, ["train", "--resume", "--out", str(out), "--iters", "6"])
    assert resumed.exit_code == 0, resumed.output
    assert set(train_records(out)) == set(range(1, 7))
    assert len(opened) == streamed + 1  # taken documents come from the cache; the source opens once, to go past them


def test_cpu_step_mode(llama_checkpoint):
    """Without --step-mode a CPU run takes the faster mode there (model.DEFAULT_CPU_STEP_MODE); a given one stands."""
    assert qstar.load(str(llama_checkpoint), backend="torch").step_mode == "one-pass"
    assert qstar.load(str(llama_checkpoint), backend="torch", step_mode="two-pass").step_mode == "two-pass"
