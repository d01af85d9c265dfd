from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import FAMILIES, TINY, make_checkpoint, make_hf_checkpoint


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n auto`) each worker takes its share of the cores, for itself and the processes it
    starts (OMP_NUM_THREADS, read by PyTorch at import): workers that each took every core would fight over them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of one expensive session fixture run on one xdist worker (`--dist loadgroup`), which builds it once."""
    for item in items:
        shared = {"smollm2", "openelm"} & set(getattr(item, "fixturenames", ()))
        if shared:
            item.add_marker(pytest.mark.xdist_group(min(shared)))


@pytest.fixture(scope="session", params=sorted(TINY))
def hf_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(model_type, directory) of a tiny random HF checkpoint with tokenizer files, one per supported type."""
    return request.param, make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(model_type, directory) of a tiny random checkpoint of every supported family, OpenELM included (which
    transformers does not build): for the checks that need no transformers model."""
    return request.param, make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def quantizable_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose every Linear splits into whole quantization groups of 32 or 64 (the other tiny checkpoints'
    layers have 48 columns): the float base of the QLoRA tests on both backends."""
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return make_hf_checkpoint(tmp_path_factory.mktemp("quantizable"), "llama", **shape)


@pytest.fixture(scope="session")
def mixing_checkpoint(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qstar checkpoint with a non-zero mixing head, so that thoughts matter and every parameter receives gradient."""
    import numpy as np
    import torch

    import qstar

    m = qstar.load(str(llama_checkpoint), backend="torch", thought_tokens=2, lookahead=2, policy_weight=1.0)
    with torch.no_grad():
        head = m.parameters()["mixing_head.4.weight"]
        head.copy_(torch.from_numpy(np.random.default_rng(5).normal(0, 0.3, tuple(head.shape))))
    return m.save(tmp_path_factory.mktemp("mixing") / "ckpt")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub probe reports it reachable: for the tests that fake a hub client (this machine has no network)."""
    monkeypatch.setattr("qstar.core.hub.hub_unreachable", lambda: None)
