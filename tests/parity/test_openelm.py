"""OpenELM, the seed implementation's second family, on both backends: its hub-format checkpoints (fused projections,
layer-wise scaling, no tokenizer) read into the one model definition, computing what mlx-lm's own OpenELM computes,
converted with another model's tokenizer, trained (full, LoRA, QLoRA, FSDP2), generated from, and written back under
OpenELM's names so that mlx-lm still loads the base. (tests/parity/test_torch_vs_mlx.py and
tests/mlx/test_mlx_lm_parity.py run their checks on a tiny OpenELM too.)"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import (
    OPENELM,
    TORCHRUN_ENV,
    TRAIN_SMALL,
    char_tokenizer,
    make_openelm_checkpoint,
    random_ids,
    rel,
    torchrun_train,
)
from mlx_lm.utils import load_model
from safetensors.numpy import load_file
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.bench import random_checkpoint
from qstar.core.lora import LoraConfig
from qstar.core.memory import MODELS, counts
from qstar.core.model_config import shape_config

runner = CliRunner()


@pytest.fixture(scope="module")
def openelm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openelm_checkpoint(tmp_path_factory.mktemp("openelm") / "hub")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model's tokenizer (the seed used Llama-2's; here the tests' character tokenizer)."""
    path = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(openelm: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "ckpt"
    result = runner.invoke(
        app, ["convert", str(openelm), str(dst), "--backend", "torch", "--tokenizer", str(tokenizer_dir)]
    )
    assert result.exit_code == 0, result.output
    return dst


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_logits_match_mlx_lms_openelm(openelm, backend):
    ids = random_ids(2, 11)
    reference, _ = load_model(openelm, strict=True)  # mlx-lm's own openelm.py, on the hub's names
    want = np.array(reference(mx.array(ids)))
    got = qstar.load(str(openelm), backend=backend, dtype="float32").logits(ids)
    assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())


def test_the_layers_scale_as_the_config_says(openelm):
    m = qstar.load(str(openelm), backend="torch")
    params = m.parameters()
    for i, (heads, kv) in enumerate(zip(OPENELM["num_query_heads"], OPENELM["num_kv_heads"], strict=True)):
        assert params[f"model.layers.{i}.self_attn.q_proj.weight"].shape == (heads * 8, 32)
        assert params[f"model.layers.{i}.self_attn.k_proj.weight"].shape == (kv * 8, 32)
    assert [params[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0] for i in range(3)] == [32, 64, 48]


def test_converting_without_a_tokenizer_is_one_clear_error(openelm, tmp_path):
    result = runner.invoke(app, ["convert", str(openelm), str(tmp_path / "dst"), "--backend", "torch"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "--tokenizer" in errors[0], result.output
    assert not (tmp_path / "dst").exists()


def test_a_converted_checkpoint_keeps_openelms_names_for_mlx_lm(openelm, converted):
    """The base weights are written back under OpenELM's names, fused as the hub holds them: mlx-lm loads the base of
    the qstar checkpoint from the same directory, and every weight is the source's bit for bit."""
    source, written = load_file(str(openelm / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert written.keys() == source.keys() and all(np.array_equal(written[k], source[k]) for k in source)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "openelm" and config["num_query_heads"] == OPENELM["num_query_heads"]
    load_model(converted, strict=True)
    assert (converted / "tokenizer.json").is_file()


def test_a_lora_step_agrees_across_backends_with_openelms_key_names(converted, tmp_path):
    """--lora-keys takes OpenELM's fused names: attn.qkv_proj adapts q, k and v each."""
    t = qstar.load(str(converted), backend="torch", dtype="float64", policy_weight=1.0)
    t.add_adapters(LoraConfig("lora", num_layers=2, rank=2, scale=2.0, keys=["attn.qkv_proj", "ffn.proj_2"]))
    rng = np.random.default_rng(3)
    with torch.no_grad():
        for name, p in t.parameters().items():
            if name.endswith(".lora_b") or name == "mixing_head.4.weight":
                p.copy_(torch.from_numpy(rng.normal(0, 0.1, tuple(p.shape))))
    adapter = t.save_adapter(tmp_path / "adapter")
    m = qstar.load(str(adapter), backend="mlx", dtype="float64")
    ids = random_ids(2, 9, seed=7)
    thoughts = t.sample_thoughts(ids, seed=11)
    a, b = m.loss(ids, thoughts=thoughts), t.loss(ids, thoughts=thoughts)
    assert abs(a.total - b.total) <= 2e-6 * abs(b.total)
    ga, gb = m.gradients(ids, thoughts=thoughts), t.gradients(ids, thoughts=thoughts)
    adapted = sorted(k for k in gb if k.endswith("lora_a"))
    assert sorted(ga) == sorted(gb) and len(adapted) == 2 * 4  # q, k, v, down in each of the last 2 layers
    for name in gb:
        assert np.linalg.norm(gb[name]) > 0 and rel(ga[name], gb[name]) < 1e-5, (name, rel(ga[name], gb[name]))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_convert_train_generate_from_the_command_line(converted, tmp_path, backend):
    out = tmp_path / "run"
    args = ["train", "--backend", backend, "--model", str(converted), "--out", str(out), "--iters", "2", *TRAIN_SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    generated = runner.invoke(app, ["generate", "--backend", backend, "--model", str(out / "model"), "--prompt", "ab"])
    assert generated.exit_code == 0, generated.output
    load_model(out / "model", strict=True)  # a trained checkpoint is still mlx-lm's OpenELM


def test_qlora_on_mlx(converted, tmp_path):
    quantized = tmp_path / "q4"
    args = ["convert", str(converted), str(quantized), "--backend", "mlx", "--quantize", "--q-bits", "4"]
    result = runner.invoke(app, [*args, "--q-group-size", "32"])
    assert result.exit_code == 0, result.output
    reference, _ = load_model(quantized, strict=True)  # mlx-lm's quantized OpenELM, its fused layers packed
    ids = random_ids(2, 9)
    want = np.array(reference(mx.array(ids)))
    np.testing.assert_allclose(qstar.load(str(quantized), backend="mlx").logits(ids), want, rtol=1e-4, atol=1e-4)
    out = tmp_path / "run"
    train = ["train", "--backend", "mlx", "--model", str(quantized), "--out", str(out), "--iters", "2", *TRAIN_SMALL]
    result = runner.invoke(app, [*train, "--fine-tune-type", "lora", "--num-layers", "1", "--lora-rank", "2"])
    assert result.exit_code == 0, result.output


def test_fsdp2_trains_it(converted, tmp_path):
    """Two ranks under torchrun, each decoder layer (of its own width) an FSDP2 unit."""
    command = torchrun_train(converted, tmp_path / "run", "--iters", "2")
    done = subprocess.run(command, env=TORCHRUN_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2" in done.stderr and qstar.load(str(tmp_path / "run" / "model"), backend="torch").finite()


@pytest.mark.slow
def test_the_270m_shape_is_the_hub_configs_and_steps_on_both_backends(tmp_path):
    """apple/OpenELM-270M's config.json with random weights: 16 layers of 12..20 heads, 3..5 KV heads, FFN 768..5120,
    271.5M parameters; one training step each (full on torch, LoRA on MLX, whose CPU matmul is slower)."""
    c = MODELS["OpenELM-270M"]
    assert [c.layer(i).num_heads for i in (0, 4, 5, 11, 12, 15)] == [12, 12, 16, 16, 20, 20]
    assert [c.layer(i).num_kv_heads for i in (0, 5, 15)] == [3, 4, 5]
    assert (c.layer(0).intermediate_size, c.layer(15).intermediate_size) == (768, 5120)
    assert counts(c).total - counts(c).extras == 271_527_168
    path = random_checkpoint(shape_config("OpenELM-270M"), tmp_path / "270m")
    char_tokenizer().save_pretrained(path)  # (ids below 128 of its 32000)
    model = qstar.load(str(path), backend="torch")
    assert math.isclose(sum(p.numel() for p in model.parameters().values()), counts(c).total)
    small = ["--iters", "1", "--max-seq-length", "8", "--batch-size", "1", "--thought-tokens", "1", "--lookahead", "1"]
    small += ["--thoughts-per-position", "2", "--val-batches", "1", "--warmup-steps", "0", "--data", "synthetic"]
    for backend, extra in (("torch", []), ("mlx", ["--fine-tune-type", "lora", "--num-layers", "1"])):
        args = ["train", "--backend", backend, "--model", str(path), "--out", str(tmp_path / backend), *small, *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
