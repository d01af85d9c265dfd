"""The opt-in compiled thought steps (TrainConfig.compile) trace without graph breaks and compute what eager does.

Traced with the aot_eager backend (dynamo and AOTAutograd, no code generation), which checks the capture without
inductor's minutes of compiling; inductor's generated kernels are torch's to test. One slow test runs `qstar train
--compile` whole, with inductor, as a user does."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from helpers import TRAIN_SMALL, random_ids
from typer.testing import CliRunner

import qstar
from qstar.cli.main import app
from qstar.torch_backend.backbone import FlexBias


def loss_and_gradients(m: qstar.QStarModel, ids: np.ndarray) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
    terms = m.terms(ids, seed=2)
    terms.total.backward()
    grads = {name: p.grad.numpy().copy() for name, p in m.parameters().items()}
    m.backbone.zero_grad(set_to_none=True)
    return float(terms.total.detach()), terms.thoughts.numpy(), grads


@pytest.mark.slow
def test_compiled_thought_steps_match_eager(mixing_checkpoint):
    from torch._dynamo.utils import counters

    ids = random_ids(2, 12, seed=4)
    m = qstar.load(
        str(mixing_checkpoint), backend="torch", step_mode="one-pass", thought_tokens=2, lookahead=2, policy_weight=1.0
    )
    want_total, want_thoughts, want_grads = loss_and_gradients(m, ids)
    torch._dynamo.reset()
    counters.clear()
    m.backbone.compile_thought_steps(backend="aot_eager")
    total, thoughts, grads = loss_and_gradients(m, ids)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    np.testing.assert_array_equal(thoughts, want_thoughts)
    assert abs(total - want_total) <= 1e-6 * abs(want_total)
    for name, g in want_grads.items():
        assert np.linalg.norm(grads[name] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-8), name


def test_the_sampling_loop_is_captured_whole_with_nothing_on_the_host(mixing_checkpoint, monkeypatch):
    """Two-pass steps sample in `thinker.sampling_loop`: torch.compile(fullgraph=True) traces its k steps without a
    graph break (fullgraph raises at the first), and between the first step and the last nothing is copied to the
    device or read back from it (counted while the loop runs). It draws what the eager loop draws."""
    from qstar.core import thinker

    m = qstar.load(str(mixing_checkpoint), backend="torch", step_mode="two-pass", thought_tokens=3, lookahead=2)
    ops, ids = m.ops, random_ids(2, 10, seed=5)
    transfers: list[str] = []

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            transfers.append(name)
            return fn(*args, **kwargs)

        return wrapper

    def watched_loop(*args):
        with monkeypatch.context() as inside:
            for name in ("asarray", "constant", "to_numpy"):
                inside.setattr(ops, name, counted(name, getattr(ops, name)))
            for name in ("item", "tolist", "numpy", "cpu"):
                inside.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
            inside.setattr(torch, "from_numpy", counted("from_numpy", torch.from_numpy))
            return thinker.sampling_loop(*args)

    monkeypatch.setattr(m.backbone, "call_loop", lambda loop, *args, **_: watched_loop(*args))
    torch.manual_seed(0)
    eager = m.sample_thoughts(ids)
    assert transfers == []
    torch._dynamo.reset()
    compiled = torch.compile(thinker.sampling_loop, fullgraph=True, dynamic=False, backend="aot_eager")
    monkeypatch.setattr(m.backbone, "call_loop", lambda loop, *args, **_: compiled(*args))
    torch.manual_seed(0)
    np.testing.assert_array_equal(m.sample_thoughts(ids), eager)


def test_flex_attention_computes_the_split_attention(mixing_checkpoint):
    """FlexAttention (Model.attention = "flex") for the pass over all thought steps, against qstar's split attention:
    forward on the CPU (its backward exists on CUDA only: tests/torch/test_cuda.py). float32; measured 4e-7."""
    m = qstar.load(str(mixing_checkpoint), backend="torch", thought_tokens=3, lookahead=2)
    ids = random_ids(2, 10, seed=6)
    thoughts = m.sample_thoughts(ids, seed=1)
    split = m.loss(ids, thoughts=thoughts)
    m.backbone.attention = "flex"
    flex = m.loss(ids, thoughts=thoughts)
    assert any(isinstance(p.bias, FlexBias) for p in m.backbone.placed.values())  # it did take the flex path
    assert abs(flex.total - split.total) <= 1e-5 * abs(split.total)
    for a, b in zip(flex.nll_talk + flex.mixing_weight, split.nll_talk + split.mixing_weight, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.slow
def test_later_steps_never_recompile(mixing_checkpoint):
    """A compiled two-pass step (thought steps and sampling loop), then 4 more over other data of the same shape:
    every graph is made in the first step, none after (a recompile costs what the first compile did)."""
    from torch._dynamo.utils import counters

    m = qstar.load(str(mixing_checkpoint), backend="torch", step_mode="two-pass", thought_tokens=2, lookahead=2)
    torch._dynamo.reset()
    counters.clear()
    m.backbone.compile_thought_steps(backend="aot_eager")
    m.backbone.compile_sampling_loop(backend="aot_eager")
    graphs = []
    for step in range(5):
        torch.manual_seed(step)  # training's noise: torch's generator (numpy's is an eager-only path)
        m.terms(random_ids(2, 12, seed=10 + step)).total.backward()
        m.backbone.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs[1:] == [graphs[0]] * 4, graphs
    assert not counters["recompiles"] and not counters["graph_break"]


@pytest.mark.slow
def test_a_compiled_default_run_ends_with_its_summary(llama_checkpoint, tmp_path, monkeypatch):
    """`qstar train --compile` on the default run's path (synthetic data, the toy recipe, the default step mode) with
    inductor: the steps and validations run the compiled graphs, and the summary's held-out measurement (seeded: keyed
    noise, which takes the eager sampling loop) finishes, so the run exits 0 with its summary. The summary's held-out
    set is cut to 16 documents (the same code, fewer rows)."""
    from torch._dynamo.utils import counters

    from qstar.core import toy_effect

    monkeypatch.setattr(toy_effect, "measure", partial(toy_effect.measure, count=16))
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "run"
    args = ["train", "--backend", "torch", "--model", str(llama_checkpoint), "--out", str(out), "--recipe", "toy"]
    result = CliRunner().invoke(app, [*args, "--compile", "--iters", "2", "--threads", "1", *TRAIN_SMALL])
    assert result.exit_code == 0, result.output
    assert "summary: held-out next-token NLL" in result.output, result.output
    assert "held-out (16 documents" in result.output, result.output
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert (out / "model" / "model.safetensors").is_file()
