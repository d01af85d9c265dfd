"""QLoRA on MLX: `qstar convert --quantize` writes an mlx-lm-quantized base (mixing head and thought vectors stay
float), logits go through the quantized head, and adapters train on top while the packed weights stay put."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import TRAIN_SMALL, random_ids
from mlx_lm.utils import load_model
from safetensors.numpy import load_file
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app


@pytest.fixture(scope="module")
def quantized(quantizable_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q8") / "ckpt"
    args = ["convert", str(quantizable_base), str(out), "--backend", "mlx", "--quantize", "--q-bits", "8"]
    result = CliRunner().invoke(app, [*args, "--q-group-size", "32"])
    assert result.exit_code == 0, result.output
    return out


def test_the_quantized_base_is_mlx_lms_and_close_to_the_original(quantized, quantizable_base):
    m = qstar.load(str(quantized), backend="mlx")
    assert m.quantization == {"group_size": 32, "bits": 8}
    packed = load_file(str(quantized / "model.safetensors"))
    linears = [k.removesuffix(".weight") for k in load_file(str(quantizable_base / "model.safetensors")) if "proj" in k]
    assert linears and all(packed[f"{k}.weight"].dtype == np.uint32 and f"{k}.scales" in packed for k in linears)
    extras = load_file(str(quantized / "qstar.safetensors"))
    assert all(v.dtype == np.float32 for v in extras.values()) and "mixing_head.0.weight" in extras
    ids = random_ids(2, 9, seed=1)
    reference, _ = load_model(quantized, strict=True)  # mlx-lm reads the base from the same directory
    np.testing.assert_allclose(m.logits(ids), np.array(reference(mx.array(ids))), rtol=1e-4, atol=1e-4)
    plain = qstar.load(str(quantizable_base), backend="mlx").logits(ids)
    assert np.linalg.norm(m.logits(ids) - plain) / np.linalg.norm(plain) < 0.02  # 8 bits
    out = m.next_token_logits(ids, seed=0)  # inspect's path: no lookahead token to embed
    np.testing.assert_array_equal(out.plain, m.logits(ids))


def test_a_quantized_base_is_refused_where_it_cannot_work(quantized, tmp_path):
    with pytest.raises(ValueError, match="MLX-quantized.*--backend mlx"):
        qstar.load(str(quantized), backend="torch")
    result = CliRunner().invoke(app, ["train", "--backend", "mlx", "--model", str(quantized), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--fine-tune-type lora" in result.output


def test_a_qlora_run_trains_the_adapters_and_leaves_the_packed_base(quantized, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--backend", "mlx", "--model", str(quantized), "--out", str(out), "--iters", "2", *TRAIN_SMALL]
    result = CliRunner().invoke(app, [*args, "--fine-tune-type", "lora", "--num-layers", "1", "--lora-rank", "2"])
    assert result.exit_code == 0, result.output
    saved = load_file(str(out / "model" / "adapters.safetensors"))
    assert any(k.endswith("lora_b") and v.any() for k, v in saved.items())
    before = qstar.load(str(quantized), backend="mlx").parameters()
    after = qstar.load(str(out / "model"), backend="mlx").parameters()
    for name, value in after.items():
        if name not in saved:
            assert mx.array_equal(value, before[name]).item(), name
