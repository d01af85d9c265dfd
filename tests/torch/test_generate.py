"""Generation with a KV cache (batched, left-padded) equals the slow definition: everything recomputed per token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_hf_checkpoint
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.layout import ThoughtLayout
from qstar.core.losses import mix


def slow_generate(m: qstar.QStarModel, prompt: list[int], steps: int) -> tuple[list[int], list[list[int]]]:
    """Greedy decoding with greedy thoughts, recomputing the whole sequence and the whole thought every time."""
    net, k, banned = m.backbone, m.recipe.thought_tokens, m.banned
    start, end = net.thought_vectors()
    tokens, thoughts = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([tokens])
        h0, base_kv = net.base(ids)
        layout = ThoughtLayout(len(tokens), np.array([len(tokens) - 1]))
        thought: list[int] = []
        for s in range(1, k + 3):
            inputs = [start[None]] + [net.embed(torch.tensor([t])) for t in thought]
            if s == k + 2:
                inputs.append(end[None])
            x = torch.cat(inputs)[None, :, None]  # (1, s, 1, D)
            h, _ = net.think(x, layout.steps(1, len(inputs)), base_kv, None)
            if s <= k:
                thought.append(int(np.where(banned, -np.inf, net.logits(h[0, -1, 0]).numpy()).argmax()))
        hb, ht = h0[0, -1], h[0, -1, 0]
        w = mix(m.ops, m.recipe, net.mixing(hb, ht))
        logits = net.logits(hb + w * (ht - hb)).numpy()
        tokens.append(int(np.where(banned, -np.inf, logits).argmax()))
        thoughts.append(thought)
    return tokens[len(prompt) :], thoughts


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: tied embeddings and attention biases
def test_cached_batched_generation_equals_recomputation(tmp_path, model_type):
    path = make_hf_checkpoint(tmp_path, model_type)
    m = qstar.load(str(path), backend="torch", thought_tokens=3, sample_temperature=0.0)
    with torch.no_grad():  # a mixing head that actually mixes
        m.backbone.mixing_head[4].weight.normal_(0, 3.0)
        prompts = [[5, 9, 13, 7, 40, 41, 22], [17, 3], [60, 61, 62, 63]]
        out = m.generate(prompts, max_tokens=6, thoughts=True)
        for prompt, got in zip(prompts, out, strict=True):
            tokens, thoughts = slow_generate(m, prompt, 6)
            assert got.tokens == tokens
            assert [m.tokenizer.decode(t, skip_special_tokens=True) for t in thoughts] == got.thoughts
        plain = m.generate(prompts, max_tokens=6, thoughts=False)
        assert any(a.tokens != b.tokens for a, b in zip(plain, out, strict=True))  # the thoughts did matter


def test_generate_bad_input(llama_checkpoint):
    m = qstar.load(str(llama_checkpoint), backend="torch")
    with pytest.raises(ValueError, match="empty prompt"):
        m.generate("   ")
    with pytest.raises(ValueError, match="the prompt has 1030 tokens, more than the model's context of 1024"):
        m.generate("x" * 1030, max_tokens=4)
    with pytest.raises(ValueError, match="top_p must lie in"):
        m.generate("abc", top_p=0)
    with pytest.raises(ValueError, match=r"logit_bias names token ids outside the vocabulary \[0, 128\): \[130\]"):
        m.generate("abc", logit_bias={5: 1.0, 130: -100.0})
    with pytest.raises(ValueError, match="logit_bias maps token ids"):
        m.generate("abc", logit_bias={5: float("nan")})


def test_prompts_longer_than_the_context_and_generations_that_reach_it(llama_checkpoint):
    """A long prompt loses its first tokens only when asked (as lm-evaluation-harness does); a generation stops at the
    context, and says so. Context 1024; the character tokenizer gives one token a character."""
    m = qstar.load(str(llama_checkpoint), backend="torch", thought_tokens=2)
    long, short = "ab" * 520, "ab" * 508  # 1040 and 1016 characters
    cut, near = m.generate([long, short], max_tokens=20, truncate=True, thoughts=False, temperature=1.0, seed=[1, 2])
    assert (cut.truncated, cut.prompt_tokens, len(cut.tokens), cut.stop) == (17, 1023, 1, "context")
    assert (near.truncated, near.prompt_tokens, len(near.tokens), near.stop) == (0, 1016, 8, "context")
    alone = m.generate([long[-1023:]], max_tokens=20, thoughts=False, temperature=1.0, seed=[1])[0]
    assert alone.tokens == cut.tokens  # the kept tokens are the prompt's last ones, as if it had been that short


def test_row_seeds_make_each_row_independent_of_its_batch(llama_checkpoint):
    m = qstar.load(str(llama_checkpoint), backend="torch", thought_tokens=2)
    prompts = ["abcabc", "xyz", "hello there"]
    together = m.generate(prompts, max_tokens=6, temperature=1.0, seed=[7, 8, 9])
    for prompt, row_seed, expected in zip(prompts, [7, 8, 9], together, strict=True):
        alone = m.generate([prompt], max_tokens=6, temperature=1.0, seed=[row_seed])[0]
        assert (alone.tokens, alone.thoughts) == (expected.tokens, expected.thoughts)
    assert together[0].stop in ("eos", "max_tokens")


def test_sampling_filters_keep_only_the_nucleus(llama_checkpoint):
    from qstar.core.sampling import nucleus

    m = qstar.load(str(llama_checkpoint), backend="torch")
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda z: torch.isfinite(z)[0].tolist()  # noqa: E731
    assert kept(nucleus(m.ops, logits, top_k=2, top_p=None)) == [True, True, False, False]
    assert kept(nucleus(m.ops, logits, top_k=None, top_p=0.7)) == [True, True, False, False]
    assert kept(nucleus(m.ops, logits, top_k=None, top_p=0.81)) == [True, True, True, False]
    assert kept(nucleus(m.ops, logits, top_k=None, top_p=0.5)) == [True, False, False, False]


def with_generation_config(src: Path, dst: Path, eos: object) -> Path:
    """A copy of the checkpoint `src` with a generation_config.json whose eos_token_id is `eos`."""
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    return dst


def test_every_eos_id_of_generation_config_ends_generation(llama_checkpoint, tmp_path):
    """A checkpoint converted from Hugging Face carries generation_config.json, whose eos_token_id may be a list (as
    instruction-tuned models' are): each id ends a row, in model.generate and `qstar generate` alike, beside the
    tokenizer's EOS; conversion and every save keep the file."""
    plain = qstar.load(str(llama_checkpoint), backend="torch").generate("abc", max_tokens=6, thoughts=False)[0]
    third = plain.tokens[2]
    first = plain.tokens.index(third)  # the first time the model emits that token
    assert plain.stop == "max_tokens" and first < 5
    for name, eos in [("listed", [2, third]), ("one", third)]:
        ckpt = with_generation_config(llama_checkpoint, tmp_path / name, eos)
        m = qstar.load(str(ckpt), backend="torch")
        assert m.info.eos_ids == {2, third}
        ended = m.generate("abc", max_tokens=6, thoughts=False)[0]
        assert (ended.stop, ended.tokens) == ("eos", plain.tokens[: first + 1])
    args = ["generate", "--backend", "torch", "--model", str(ckpt), "--prompt", "abc", "--max-tokens", "6"]
    result = CliRunner().invoke(app, [*args, "--no-thoughts", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["stop"] == "eos"
    converted = qstar.convert(str(tmp_path / "listed"), str(tmp_path / "converted"), backend="torch")
    saved = converted.save(tmp_path / "saved")
    for path in (tmp_path / "converted", saved):
        assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [2, third]
        assert qstar.load(str(path), backend="torch").info.eos_ids == {2, third}
