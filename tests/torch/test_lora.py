"""LoRA/DoRA adapters: what trains, what stays, fusing, resuming (qstar/core/lora.py); the MLX side of the
format is in tests/parity/test_lora_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TINY,
    TRAIN_SMALL,
    backend_params,
    killed_at_random_and_uninterrupted,
    make_hf_checkpoint,
    random_ids,
)
from safetensors.numpy import load_file
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.core.lora import WEIGHTS_FILE, LoraConfig

LORA = ["--fine-tune-type", "lora", "--num-layers", "1", "--lora-rank", "2"]


def adapted(path, fine_tune_type: str = "lora", seed: int = 3) -> qstar.QStarModel:
    """The checkpoint in float64 with adapters on every layer, lora_b random so that the adapters matter."""
    m = qstar.load(str(path), backend="torch", dtype="float64")
    m.add_adapters(LoraConfig(fine_tune_type, num_layers=-1, rank=2, scale=2.0))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in m.parameters().items():
            if name.endswith((".lora_b", ".m")):
                p.add_(torch.from_numpy(rng.normal(0, 0.05, tuple(p.shape))))
    return m


def test_only_adapters_thought_vectors_and_mixing_head_get_gradients(mixing_checkpoint):
    m = adapted(mixing_checkpoint, "dora")
    grads = m.gradients(random_ids(2, 9, seed=1), seed=0)
    leaves = {name.rsplit(".", 1)[-1] for name in grads if ".layers." in name}
    assert leaves == {"lora_a", "lora_b", "m"}
    assert {"thought.start", "thought.end", "mixing_head.0.weight", "mixing_head.4.weight"} <= set(grads)
    assert not any(name.endswith("proj.weight") or "embed" in name or "norm" in name for name in grads)
    assert all(np.linalg.norm(g) > 0 for g in grads.values()), [k for k, g in grads.items() if not g.any()]


@pytest.mark.parametrize("backend", backend_params("torch", "mlx"))
def test_a_lora_run_leaves_the_base_weights_bit_unchanged(mixing_checkpoint, tmp_path, backend):
    """Whichever backend trained the adapter, torch reads it: the base bit for bit, the rest from the adapter."""
    out = tmp_path / "run"
    args = ["train", "--backend", backend, "--model", str(mixing_checkpoint), "--out", str(out), *LORA]
    args += ["--iters", "2", *TRAIN_SMALL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = load_file(str(out / "model" / WEIGHTS_FILE))
    before = qstar.load(str(mixing_checkpoint), backend="torch").parameters()
    after = qstar.load(str(out / "model"), backend="torch")
    for name, value in after.parameters().items():
        if name in saved:
            assert torch.equal(value, torch.from_numpy(saved[name])), name
        else:
            assert torch.equal(value, before[name]), name  # the base, bit for bit
    assert {"thought.start", "thought.end", "mixing_head.4.weight"} <= set(saved)
    for name in ("thought.start", "mixing_head.4.weight"):
        assert not torch.equal(torch.from_numpy(saved[name]), before[name]), name  # they trained
    assert any(k.endswith("lora_b") and saved[k].any() for k in saved)  # the adapters left zero


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_the_fused_model_computes_what_base_plus_adapter_does(mixing_checkpoint, tmp_path, fine_tune_type):
    m = adapted(mixing_checkpoint, fine_tune_type)
    ids = random_ids(2, 9, seed=2)
    want = m.logits(ids)
    assert np.abs(want - qstar.load(str(mixing_checkpoint), backend="torch", dtype="float64").logits(ids)).max() > 1e-3
    m.fuse()
    np.testing.assert_allclose(m.logits(ids), want, rtol=0, atol=1e-10)
    fused = qstar.load(str(m.save(tmp_path / "fused")), backend="torch", dtype="float64")
    np.testing.assert_allclose(fused.logits(ids), want, rtol=0, atol=1e-10)


def test_fuse_command_writes_a_plain_checkpoint(mixing_checkpoint, tmp_path):
    adapter = adapted(mixing_checkpoint).save_adapter(tmp_path / "adapter")
    result = CliRunner().invoke(app, ["fuse", "--adapter-path", str(adapter), "--out", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    ids = random_ids(2, 9, seed=4)
    want = qstar.load(str(adapter), backend="torch", dtype="float64").logits(ids)
    got = qstar.load(str(tmp_path / "fused"), backend="torch", dtype="float64").logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # through the float32 fused checkpoint


@pytest.mark.parametrize("model_type", sorted(set(TINY) - {"llama"}))  # llama: the adapter's own base
def test_an_adapter_on_another_base_is_refused_by_name(mixing_checkpoint, tmp_path, model_type):
    other = make_hf_checkpoint(tmp_path / model_type, model_type)
    adapter = adapted(mixing_checkpoint).save_adapter(tmp_path / "adapter")
    with pytest.raises((ValueError, TypeError), match="adapter|Linear"):
        qstar.load(str(other), backend="torch", adapter_path=adapter)


def test_killed_lora_run_resumes_exactly(llama_checkpoint, tmp_path):
    whole, broken = killed_at_random_and_uninterrupted("torch", llama_checkpoint, tmp_path, kills=3, extra=LORA)
    wa = load_file(str(whole / "model" / WEIGHTS_FILE))
    wb = load_file(str(broken / "model" / WEIGHTS_FILE))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_adapter_run_trains_what_it_trained_before(mixing_checkpoint, tmp_path):
    """--train-only inside an adapter run holds on --resume: the adapters stay at zero, the mixing head moves."""
    out = tmp_path / "run"
    args = ["train", "--backend", "torch", "--model", str(mixing_checkpoint), "--out", str(out), *LORA, *TRAIN_SMALL]
    args += ["--train-only", "mixing_head", "--save-every", "1"]
    assert CliRunner().invoke(app, [*args, "--iters", "2"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--iters", "3", "--resume"])
    assert result.exit_code == 0, result.output
    before, after = (load_file(str(out / "checkpoints" / f"step-{n:07d}" / WEIGHTS_FILE)) for n in (2, 3))
    assert not any(v.any() for k, v in after.items() if k.endswith("lora_b"))
    assert not np.array_equal(before["mixing_head.4.weight"], after["mixing_head.4.weight"])
