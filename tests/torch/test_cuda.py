"""The CUDA subset: the torch backend on a GPU computes what it computes on the CPU and trains in bfloat16.

Skipped without a CUDA device (this CI machine has none); a lent GPU runs it through benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_ids
from transformers import AutoModelForCausalLM

import qstar
from qstar.core.data import Batch
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.session import Session as TorchSession

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
RECIPE = dict(thought_tokens=3, lookahead=2, policy_weight=1.0)


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls would round float32 to 10 mantissa bits; the comparisons below are of float32 arithmetic."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_logits_match_transformers_on_gpu(llama_checkpoint):
    ids = random_ids(2, 12, seed=3)
    m = qstar.load(str(llama_checkpoint), backend="torch", device=DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).to(DEVICE)).logits.cpu().numpy()
    assert np.abs(m.logits(ids) - want).max() < 1e-4


def test_loss_and_gradients_match_cpu(llama_checkpoint):
    ids = random_ids(2, 12, seed=5)
    cpu = qstar.load(str(llama_checkpoint), backend="torch", device="cpu", **RECIPE)
    gpu = qstar.load(str(llama_checkpoint), backend="torch", device=DEVICE, **RECIPE)
    thoughts = cpu.sample_thoughts(ids, seed=1)
    want, got = cpu.loss(ids, thoughts=thoughts), gpu.loss(ids, thoughts=thoughts)
    assert abs(got.total - want.total) <= 1e-5 * abs(want.total)
    assert np.abs(got.nll_base - want.nll_base).max() < 1e-4
    grads_cpu, grads_gpu = cpu.gradients(ids, thoughts=thoughts), gpu.gradients(ids, thoughts=thoughts)
    for name, g in grads_cpu.items():
        assert np.linalg.norm(grads_gpu[name] - g) <= 1e-4 * max(np.linalg.norm(g), 1e-8), name


def test_sampled_training_step_in_bfloat16(llama_checkpoint):
    cfg = TrainConfig(
        model=str(llama_checkpoint), dtype="bfloat16", max_seq_length=12, batch_size=2, recipe_overrides=RECIPE
    )
    m = qstar.load(str(llama_checkpoint), backend="torch", dtype="bfloat16", device=DEVICE, recipe=cfg.make_recipe())
    session = TorchSession(m, cfg)
    ids = random_ids(2, 12, seed=9)
    before = {k: v.detach().float().cpu().clone() for k, v in m.parameters().items()}
    metrics = session.step([Batch(ids, np.ones(ids.shape, bool))], 1e-3)
    assert all(np.isfinite(v) for v in metrics.values())
    moved = [k for k, v in m.parameters().items() if not torch.equal(v.detach().float().cpu(), before[k])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved
    assert session.peak_memory() > 0


def test_two_pass_equals_one_pass_on_gpu(mixing_checkpoint):
    """float32 on the GPU: the same thoughts for the same noise, losses and gradients to float32 rounding."""
    ids = random_ids(2, 12, seed=6)
    one = qstar.load(str(mixing_checkpoint), backend="torch", device=DEVICE, step_mode="one-pass", **RECIPE)
    two = qstar.load(str(mixing_checkpoint), backend="torch", device=DEVICE, step_mode="two-pass", **RECIPE)
    a, b = one.loss(ids, seed=3), two.loss(ids, seed=3)
    assert (a.thoughts == b.thoughts).all()
    assert abs(a.total - b.total) <= 1e-5 * abs(a.total)
    ga, gb = one.gradients(ids, seed=3), two.gradients(ids, seed=3)
    for name, g in ga.items():
        assert np.linalg.norm(gb[name] - g) <= 1e-4 * max(np.linalg.norm(g), 1e-8), name


def test_flex_attention_gradients_equal_split_attention(mixing_checkpoint):
    """FlexAttention's backward (CUDA only) against the split attention's, float32, over all thought steps."""
    ids = random_ids(2, 12, seed=7)
    m = qstar.load(str(mixing_checkpoint), backend="torch", device=DEVICE, **RECIPE)
    thoughts = m.sample_thoughts(ids, seed=2)
    split = m.gradients(ids, thoughts=thoughts)
    m.backbone.attention = "flex"
    flex = m.gradients(ids, thoughts=thoughts)
    assert any(type(p.bias).__name__ == "FlexBias" for p in m.backbone.placed.values())
    for name, g in split.items():
        assert np.linalg.norm(flex[name] - g) <= 1e-4 * max(np.linalg.norm(g), 1e-8), name


def test_captured_sampling_loop_draws_from_the_thought_distribution(mixing_checkpoint):
    """The sampling loop compiled whole as CUDA graphs (TrainConfig.compile), replayed: inductor draws its own random
    numbers (not eager's, unless fallback_random), so the check is of the law, not of the bits. The first thought
    token of every stream is a draw from softmax(step-1 logits / T) over the allowed ids, which the model computes
    exactly: over many replays the mean log-probability of the drawn tokens must be the distribution's (minus its
    entropy) within 5 standard errors, as the eager loop's is; replays must differ from each other."""
    from qstar.core.layout import ThoughtLayout
    from qstar.core.sampling import allowed

    ids = random_ids(2, 12, seed=8)
    m = qstar.load(str(mixing_checkpoint), backend="torch", device=DEVICE, step_mode="two-pass", **RECIPE)
    rows = ids.shape[0] * m.recipe.thoughts_per_position
    thinker, layout, ops = m.thinker(), ThoughtLayout.every(12), m.ops
    with torch.no_grad():
        _, base_kv = m.backbone.base(ops.asarray(ids))
        x = thinker.start_inputs(rows, layout.num_streams)
        h, _ = m.backbone.think(x, layout.steps(1, 1), base_kv, None)
        z = m.backbone.logits(h[:, 0])  # (R, S, V): what step 1 draws from
        logp = torch.log_softmax(allowed(ops, z, thinker.banned) / m.recipe.sample_temperature, -1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1).mean().item()
    spread = (p * torch.where(p > 0, logp, 0.0) ** 2).sum(-1).mean().item() - entropy**2

    def mean_logprob(draws: int) -> tuple[float, int]:
        firsts = []
        for seed in range(draws):
            torch.manual_seed(seed)
            firsts.append(torch.from_numpy(m.sample_thoughts(ids)[..., 0]).to(z.device))
        tokens = torch.stack(firsts)  # (draws, R, S)
        picked = logp.unsqueeze(0).expand(draws, *logp.shape).gather(-1, tokens[..., None])[..., 0]
        return picked.mean().item(), len({t.cpu().numpy().tobytes() for t in firsts})

    draws = 64
    bound = 5 * (max(spread, 1e-6) / (draws * rows * layout.num_streams)) ** 0.5 + 1e-3
    eager, _ = mean_logprob(draws)
    m.backbone.compile_sampling_loop()
    compiled, distinct = mean_logprob(draws)
    assert abs(eager + entropy) < bound and abs(compiled + entropy) < bound, (eager, compiled, -entropy, bound)
    assert distinct > draws // 2  # the captured graphs draw anew at every replay
