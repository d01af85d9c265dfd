"""`qstar train` on MLX: the loss goes down, checkpoints load on both backends, a killed run resumes bit-exactly,
the step compiles once, and one step agrees with the PyTorch session.

Note: on Linux, MLX compiles the fused kernels of a compiled graph with the system C++ compiler and caches them in
$TMPDIR/mlx/<version>/cpu; the first run on a machine spends about a minute there (float32 graph), later runs
seconds.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    killed_at_random_and_uninterrupted,
    mixing_head_only_training,
    no_thought_training,
    random_ids,
    rel,
    short_training,
    train_records,
)
from mlx.utils import tree_flatten

import qstar
from qstar.core.checkpoint import EXTRA_PREFIXES
from qstar.core.data import Batch
from qstar.core.session import evaluate
from qstar.core.train_config import TrainConfig
from qstar.mlx_backend.session import Session as MLXSession
from qstar.mlx_backend.session import random_key, set_random_key

RECIPE = dict(thought_tokens=2, lookahead=2, policy_weight=1.0)


def batches(seed: int, count: int, padded: bool = False) -> list[Batch]:
    out = [Batch(random_ids(2, 16, seed=seed + i), np.ones((2, 16), bool)) for i in range(count)]
    if padded:
        out[0].mask[1, 11:] = False
    return out


def session(path: Path, **settings) -> MLXSession:
    cfg = TrainConfig(model=str(path), max_seq_length=16, batch_size=2, recipe_overrides=RECIPE, **settings)
    return MLXSession(qstar.load(str(path), backend="mlx", dtype=cfg.dtype, recipe=cfg.make_recipe()), cfg)


@contextmanager
def uncompiled():
    """Run the session's compiled functions eagerly: same Python code, no kernel fusion (which on Linux builds a new
    set of C++ kernels per dtype, about a minute the first time)."""
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()


def test_short_training_lowers_the_loss_and_saves_a_loadable_model(llama_checkpoint, tmp_path):
    out = short_training("mlx", llama_checkpoint, tmp_path)
    train = train_records(out)
    assert all(np.isfinite(r["grad_norm"]) and r["peak_memory_gb"] > 0 for r in train.values())
    m = qstar.load(str(out / "model"), backend="mlx")
    t = qstar.load(str(out / "model"), backend="torch")
    assert m.recipe.thought_tokens == t.recipe.thought_tokens == 2 and m.recipe.policy_weight == 1
    wm, wt = m.parameters(), t.parameters()
    assert sorted(wm) == sorted(wt)
    assert all(np.array_equal(np.array(wm[k]), wt[k].detach().numpy()) for k in wm)
    start = qstar.load(str(llama_checkpoint), backend="mlx", **RECIPE).parameters()
    assert not np.array_equal(np.array(start["lm_head.weight"]), np.array(wm["lm_head.weight"]))


def test_training_only_the_mixing_head(llama_checkpoint, tmp_path):
    mixing_head_only_training("mlx", llama_checkpoint, tmp_path)


def test_the_no_thought_twin_trains_the_language_model_alone(llama_checkpoint, tmp_path):
    no_thought_training("mlx", llama_checkpoint, tmp_path)


def test_killed_run_resumes_exactly(llama_checkpoint, tmp_path):
    """Weights, AdamW moments and step, and the mx.random key are all in the checkpoint, and the compiled graph
    is the same in every process: the resumed run repeats the uninterrupted one bit for bit."""
    whole, broken = killed_at_random_and_uninterrupted("mlx", llama_checkpoint, tmp_path)
    wa = qstar.load(str(whole / "model"), backend="mlx").parameters()
    wb = qstar.load(str(broken / "model"), backend="mlx").parameters()
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


def test_step_compiles_once_and_evaluation_leaves_the_training_random_state(llama_checkpoint):
    s = session(llama_checkpoint, grad_accumulation_steps=2)
    for i in range(4):  # new data every step, one of them padded: the same graphs
        s.step(batches(10 * i, 2, padded=i == 2), 1e-3)
    val = batches(100, 2)
    key = random_key()
    first = evaluate(s, val, seed=5)
    assert (random_key() == key).all()
    assert evaluate(s, val, seed=5) == first != evaluate(s, val, seed=6)
    assert dict(s.traces) == {"accumulate": 1, "step": 1, "evaluate": 1}

    # Evaluating between steps changes nothing in training. (Sessions share MLX's one global random key and each
    # seeds it when created: run them one after the other.)
    plain = session(llama_checkpoint)
    want = [plain.step(batches(10 * i, 1), 1e-3) for i in range(3)]
    checked = session(llama_checkpoint)
    for i in range(3):
        evaluate(checked, val, seed=i)
        assert checked.step(batches(10 * i, 1), 1e-3) == want[i]


@pytest.mark.parametrize("thoughts", ["greedy", "given"])
def test_one_step_matches_torch(mixing_checkpoint, thoughts):
    """float32, same checkpoint and batch. "greedy" (sample_temperature 0) runs MLX's in-graph sampler, which then
    draws what torch draws; "given" feeds both the same sampled thoughts, so the policy term is non-zero.

    Tolerances: metrics, grad_norm and AdamW's first moment (0.1 * clipped gradient) agree to float32 rounding
    (measured <= 1.4e-6 relative). The first AdamW step is lr * g / (|g| + eps), nearly lr * sign(g): entries with
    tiny |g| amplify float noise, so the update per tensor agrees less well (measured <= 1e-4 relative, checked at
    1e-3), and the parameters, which the update moves by ~lr, to <= 7e-6 (checked at 1e-4)."""
    from qstar.torch_backend.session import Session as TorchSession

    recipe = {**RECIPE, "sample_temperature": 0.0 if thoughts == "greedy" else 1.0}
    cfg = TrainConfig(model=str(mixing_checkpoint), max_seq_length=16, batch_size=2, recipe_overrides=recipe)
    tm = qstar.load(str(mixing_checkpoint), backend="torch", recipe=cfg.make_recipe())
    mm = qstar.load(str(mixing_checkpoint), backend="mlx", recipe=cfg.make_recipe())
    ts, ms = TorchSession(tm, cfg), MLXSession(mm, cfg)
    batch = batches(3, 1)
    if thoughts == "given":
        given = tm.sample_thoughts(batch[0].ids, seed=4)
        terms = tm.terms
        tm.terms = lambda ids, mask, thoughts=None: terms(ids, mask, thoughts=given)
        terms_m = ms.terms  # replaces the sampler inside the traced step
        ms.terms = lambda ids, valid: terms_m(ids, valid, mx.array(given))
    before = {k: v.detach().numpy().copy() for k, v in tm.parameters().items()}

    want, got = ts.step(batch, 1e-3), ms.step(batch, 1e-3)
    assert set(want) == set(got)
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-5 * max(abs(want[key]), 1e-3), key
    if thoughts == "given":
        assert want["policy"] != 0 and want["positive_advantage"] > 0

    after_t = {k: v.detach().numpy() for k, v in tm.parameters().items()}
    after_m = {k: np.array(v) for k, v in mm.parameters().items()}
    moments = dict(tree_flatten(ms.optimizer.state))
    for (name, _), master in zip(tm.backbone.named_parameters(), ts.master, strict=True):
        assert rel(moments[f"{name}.m"], ts.optimizer.state[master]["exp_avg"].numpy()) < 1e-5, name
        assert rel(after_m[name] - before[name], after_t[name] - before[name]) < 1e-3, name
        assert rel(after_m[name], after_t[name]) < 1e-4, name
    assert int(moments["step"]) == 1


def test_head_learning_rate_scales_the_heads_step_alone(mixing_checkpoint):
    """--head-learning-rate 10x --learning-rate: on both backends the first AdamW step of the mixing head and the
    thought vectors (weight decay included) is 10 times the plain run's, every other weight's is the plain run's, and
    the two backends take the same scaled step (float64, the same given thoughts)."""
    from qstar.torch_backend.session import Session as TorchSession

    cfg = TrainConfig(model=str(mixing_checkpoint), max_seq_length=16, batch_size=2, recipe_overrides=RECIPE)
    given = qstar.load(str(mixing_checkpoint), backend="torch", recipe=cfg.make_recipe()).sample_thoughts(
        batches(3, 1)[0].ids, seed=4
    )
    steps: dict[tuple[str, float | None], dict[str, np.ndarray]] = {}
    for backend, make in (("torch", TorchSession), ("mlx", MLXSession)):
        for head in (None, 1e-2):
            run = TrainConfig(
                **{**cfg.to_dict(), "dtype": "float64", "learning_rate": 1e-3, "head_learning_rate": head}
            )
            m = qstar.load(str(mixing_checkpoint), backend=backend, dtype="float64", recipe=run.make_recipe())
            s = make(m, run)
            terms = s.terms if backend == "mlx" else m.terms
            if backend == "mlx":
                s.terms = lambda ids, valid, terms=terms: terms(ids, valid, mx.array(given))
            else:
                m.terms = lambda ids, mask, thoughts=None, terms=terms: terms(ids, mask, thoughts=given)
            before = {k: m.ops.to_numpy(v).copy() for k, v in m.parameters().items()}
            with uncompiled():
                s.step(batches(3, 1), 1e-3)
            steps[backend, head] = {k: m.ops.to_numpy(v) - before[k] for k, v in m.parameters().items()}
    heads = [k for k in steps["torch", None] if k.startswith(EXTRA_PREFIXES)]
    assert {"thought.start", "mixing_head.4.weight"} < set(heads)
    assert all(np.abs(steps["torch", None][k]).max() > 0 for k in heads)
    for backend in ("torch", "mlx"):
        plain, scaled = steps[backend, None], steps[backend, 1e-2]
        for name in plain:
            want = plain[name] * (10.0 if name in heads else 1.0)
            np.testing.assert_allclose(scaled[name], want, rtol=1e-9, atol=1e-15, err_msg=f"{backend} {name}")
    for name in heads:  # mlx and torch place AdamW's eps differently: ~1e-5 of a first step, scaled or not
        diff = rel(steps["mlx", 1e-2][name], steps["torch", 1e-2][name])
        assert diff < 1e-4 and diff == pytest.approx(rel(steps["mlx", None][name], steps["torch", None][name])), name


def test_bfloat16_master_weights_and_resume(llama_checkpoint, tmp_path):
    """float32 master weights take the AdamW update, the bf16 parameters are their rounding, and write_state /
    read_state carry masters, moments and the random key (eager here, see `uncompiled`)."""
    with uncompiled():
        a = session(llama_checkpoint, dtype="bfloat16", weight_decay=0.1)
        start = dict(tree_flatten(a.master))
        for i in range(2):
            a.step(batches(10 * i, 1), 1e-3)
        masters = dict(tree_flatten(a.master))
        params = a.model.parameters()
        assert all(v.dtype == mx.float32 for v in masters.values())
        assert all(
            params[k].dtype == mx.bfloat16 and mx.array_equal(params[k], masters[k].astype(mx.bfloat16)) for k in params
        )
        # Updates far below bf16 resolution still accumulate in the masters.
        assert not mx.array_equal(masters["model.norm.weight"], start["model.norm.weight"])
        assert not mx.array_equal(masters["lm_head.weight"], start["lm_head.weight"])

        saved_key = random_key()
        checkpoint = a.model.save(tmp_path / "ckpt", extra=a.write_state)
        b = session(checkpoint, dtype="bfloat16", weight_decay=0.1)  # seeds the global key afresh
        b.read_state(checkpoint)
        assert (random_key() == saved_key).all()
        assert all(mx.array_equal(v, masters[k]) for k, v in tree_flatten(b.master))
        want = a.step(batches(50, 1), 1e-3)
        set_random_key(saved_key)  # a's step advanced the one global key: rewind it for b
        assert b.step(batches(50, 1), 1e-3) == want


def test_float64_state_round_trip_and_dtype_check(llama_checkpoint, tmp_path):
    """float64 moments go through numpy (mx.save_safetensors writes none); a state of another dtype is refused."""
    s = session(llama_checkpoint, dtype="float64")
    with uncompiled():
        s.step(batches(0, 1), 1e-3)
    s.write_state(tmp_path)
    before = dict(tree_flatten(s.optimizer.state))
    assert before["lm_head.weight.v"].dtype == mx.float64
    fresh = session(llama_checkpoint, dtype="float64")
    fresh.read_state(tmp_path)
    after = dict(tree_flatten(fresh.optimizer.state))
    assert sorted(after) == sorted(before) and all(mx.array_equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="same --dtype"):
        session(llama_checkpoint).read_state(tmp_path)
