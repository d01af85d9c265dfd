"""`qstar convert`: round trips, keeps the base model loadable by transformers, fails cleanly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import FIXTURE, make_hf_checkpoint, random_ids, shared_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.checkpoint import END_TOKEN, START_TOKEN

runner = CliRunner()


def test_convert_round_trip(hf_checkpoint, tmp_path):
    model_type, src = hf_checkpoint
    dst = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), str(dst), "--recipe", "paper"])
    assert result.exit_code == 0, result.output
    config = json.loads((dst / "config.json").read_text())
    assert config["qstar"]["recipe"]["thought_tokens"] == 9
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.convert_tokens_to_ids([START_TOKEN, END_TOKEN]) == [
        config["qstar"]["start_token_id"],
        config["qstar"]["end_token_id"],
    ]

    ids = random_ids(2, 12, seed=5)
    fresh = qstar.load(str(src), backend="torch", recipe="paper", thought_tokens=2, lookahead=2)
    saved = qstar.load(str(dst), backend="torch", thought_tokens=2, lookahead=2)
    assert saved.recipe == fresh.recipe
    for name, value in fresh.parameters().items():
        assert torch.equal(value, saved.parameters()[name]), name
    # the thought vectors start at the init_token's embedding, and the mixing head at w = 0 (the base LM)
    dash = fresh.tokenizer("---", add_special_tokens=False)["input_ids"]
    embed = fresh.parameters()["model.embed_tokens.weight"]
    assert torch.allclose(100 * fresh.parameters()["thought.start"], embed[dash].mean(0))
    out = saved.loss(ids, seed=0)
    assert all(np.abs(w).max() == 0 for w in out.mixing_weight)
    assert np.allclose(out.nll_talk[0], out.nll_base[:, : out.nll_talk[0].shape[1]], atol=1e-6)

    base = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)  # base weights keep their HF names
    with torch.no_grad():
        assert np.abs(base(torch.from_numpy(ids)).logits.numpy() - saved.logits(ids)).max() < 1e-5


def test_convert_without_tokenizer_uses_ids_after_vocab(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama", tokenizer=False)
    model = qstar.convert(str(src), str(tmp_path / "out"), backend="torch")
    assert (model.info.start_id, model.info.end_id) == (128, 129)
    embed = model.parameters()["model.embed_tokens.weight"]
    assert torch.allclose(100 * model.parameters()["thought.start"], embed.mean(0))


def test_convert_authors_checkpoint_keeps_the_numbers(tmp_path):
    shared_file("fixtures/reference/tiny-mistral-a/checkpoint/model.safetensors")
    dst = tmp_path / "authors"
    qstar.convert(str(FIXTURE / "checkpoint"), str(dst), dtype="float64", recipe="paper", backend="torch")
    kwargs = dict(backend="torch", dtype="float64", thought_tokens=3, lookahead=2)
    ids = random_ids(2, 12, seed=2, vocab=40)
    thoughts = np.random.default_rng(0).integers(3, 40, size=(4, 12, 3))
    a = qstar.load(str(FIXTURE / "checkpoint"), recipe="paper", **kwargs).loss(ids, thoughts=thoughts)
    b = qstar.load(str(dst), **kwargs).loss(ids, thoughts=thoughts)
    assert a.total == b.total


@pytest.mark.parametrize("problem", ["shape", "model_type", "no_weights", "exists"])
def test_bad_input_is_one_clear_error_and_nothing_written(tmp_path, problem):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    dst = tmp_path / "out"
    config = json.loads((src / "config.json").read_text())
    expected = {
        "shape": "has shape",
        "model_type": "unsupported model_type",
        "no_weights": "no model weights",
        "exists": "already exists",
    }[problem]
    if problem == "shape":
        config["intermediate_size"] = 96
    elif problem == "model_type":
        config["model_type"] = "gpt2"
    elif problem == "no_weights":
        (src / "model.safetensors").unlink()
    else:
        dst.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["convert", str(src), str(dst)])
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src"] + (["out"] if problem == "exists" else []))
    shutil.rmtree(src)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["convert", "nobody-here/no-such-model", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "pass a local checkpoint directory" in result.output


def test_sharded_save_round_trips(llama_checkpoint, tmp_path, monkeypatch):
    from qstar.core import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 40_000)
    model = qstar.load(str(llama_checkpoint), backend="torch")
    model.save(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = qstar.load(str(tmp_path / "sharded"), backend="torch")
    assert all(torch.equal(v, again.parameters()[k]) for k, v in model.parameters().items())
    ids = random_ids(1, 8)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(base(torch.from_numpy(ids)).logits.numpy() - again.logits(ids)).max() < 1e-5


@pytest.mark.parametrize("version", [2, None])
def test_checkpoint_of_another_format_version_is_refused(llama_checkpoint, tmp_path, version):
    dst = tmp_path / "out"
    qstar.convert(str(llama_checkpoint), str(dst), backend="torch")
    config = json.loads((dst / "config.json").read_text())
    config["qstar"]["format_version"] = version
    (dst / "config.json").write_text(json.dumps(config))
    advice = "upgrade qstar" if version == 2 else "convert the checkpoint again"
    with pytest.raises(ValueError, match=f"format version {version}, but this qstar reads version 1: {advice}"):
        qstar.load(str(dst), backend="torch")


def test_the_shipped_model_starts_from_the_toy_recipe(tmp_path):
    """A plain checkpoint records no recipe: the shipped one takes `toy` (what `qstar train` uses), others default."""
    from qstar.core.recipe import make_recipe
    from qstar.weights import DEFAULT_MODEL

    assert qstar.load(DEFAULT_MODEL, backend="torch").recipe == make_recipe("toy")
    assert qstar.convert(DEFAULT_MODEL, tmp_path / "c", backend="torch").recipe == make_recipe("toy")
