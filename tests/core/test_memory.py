"""The memory estimate (qstar/core/memory.py): its parameter counts are the models', its terms move the way sharding,
adapters and checkpointing move them, and the README's table is today's estimate (tests/cli/test_bench.py measures
a step against it)."""

from __future__ import annotations

import sys

import pytest
from helpers import ROOT

import qstar
from qstar.core.bench import random_checkpoint
from qstar.core.lora import LoraConfig
from qstar.core.memory import MODELS, Step, counts, estimate, fitting, lora_parameters
from qstar.core.model_config import parse_config, shape_config

sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_table  # noqa: E402
import tables  # noqa: E402

SHAPES = [
    shape_config("small", num_hidden_layers=2),
    shape_config("small", model_type="qwen2", tie_word_embeddings=True, num_hidden_layers=2),
    shape_config("small", model_type="qwen3", head_dim=32, num_hidden_layers=2),
]


@pytest.mark.parametrize("fields", SHAPES, ids=["llama", "qwen2", "qwen3"])
def test_parameter_counts_are_the_models(tmp_path, fields):
    model = qstar.load(str(random_checkpoint(fields, tmp_path)), backend="torch")
    c, n = parse_config(fields), counts(parse_config(fields))
    assert sum(p.numel() for p in model.parameters().values()) == n.total
    adapters = LoraConfig(num_layers=-1)  # the estimate's default adapters (rank 8, seven keys) on every layer
    model.add_adapters(adapters)
    trained = sum(p.numel() for p in model.parameters().values() if p.requires_grad)
    assert trained == lora_parameters(c, adapters) + n.extras


def test_sharding_adapters_and_quantization_shrink_what_they_should():
    mistral = MODELS["Mistral-7B"]
    total = {ft: sum(estimate(mistral, Step(fine_tune=ft)).values()) for ft in ("full", "lora", "qlora")}
    assert total["qlora"] < total["lora"] < total["full"]
    full, sharded = estimate(mistral, Step()), estimate(mistral, Step(devices=8))
    assert sharded["AdamW moments (float32)"] == full["AdamW moments (float32)"] / 8
    activations = {k: v for k, v in full.items() if k.startswith("activations")}
    assert activations == {k: v for k, v in sharded.items() if k.startswith("activations")}  # per device batch
    lora8 = estimate(mistral, Step(fine_tune="lora", devices=8))
    assert lora8 == estimate(mistral, Step(fine_tune="lora"))  # adapters replicate (DDP)
    no_ckpt = sum(v for k, v in estimate(mistral, Step(grad_checkpoint=False)).items() if k.startswith("activ"))
    assert no_ckpt > 5 * sum(activations.values())
    assert "64 GB Mac" not in fitting(1.0, Step(devices=8))  # FSDP2 is torch's


def test_the_readme_table_is_todays_estimate():
    assert tables.load("memory-fits")["rows"] == memory_table.estimated_rows()
