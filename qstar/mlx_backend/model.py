"""The Llama family (llama, mistral, qwen2, qwen3) in MLX, with thought-aware attention.

Parameter names are Hugging Face's (and mlx-lm's), so checkpoints load without renaming. `base` is the
ordinary causal pass; `think` runs thought steps of every stream at once with the core's split attention
(qstar/core/attention.py): no stream ever holds a copy of the prefix keys/values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from qstar.core import attention
from qstar.core.hf_config import ModelConfig, rope_angles
from qstar.core.layout import StepGeometry, extend_mask
from qstar.mlx_backend.ops import MLXOps, sigmoid, softmax

KV = list[tuple[mx.array, mx.array]]
OPS = MLXOps()
T = TypeVar("T")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # float32 internals for every dtype, float64 included: what transformers (and the reference) compute.
        x32 = x.astype(mx.float32)
        y = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight * y.astype(x.dtype)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return x * cos + mx.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """softmax(q k^T * scale, masked) v for q (B, H, n, d) and grouped k, v (B, h, T, d); mask (B|1, 1, n, T) bool,
    None = causal. float64 avoids mx.fast, whose softmax is only float32-accurate (see ops.py)."""
    if q.dtype != mx.float64:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if mask is None else mask)
    batch, heads, n, dim = q.shape
    q = q.reshape(batch, k.shape[1], heads // k.shape[1], n, dim) * scale
    scores = q @ k[:, :, None].swapaxes(-1, -2)
    visible = mx.tril(mx.ones((n, n), dtype=mx.bool_)) if mask is None else mask[:, :, None]
    probs = softmax(mx.where(visible, scores, float("-inf")))
    return (probs @ v[:, :, None]).reshape(batch, heads, n, dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(..., D) -> rotated q (..., H, d), k (..., h, d) and v (..., h, d)."""
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(*lead, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(*lead, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def extend(
        self, x: mx.array, cos: mx.array, sin: mx.array, past: tuple[mx.array, mx.array] | None, mask: mx.array | None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Causal attention of (B, n, D) after `past` keys/values; returns the output and the keys/values
        (B, h, T, d) including the new tokens. mask None: plain causal attention without a past."""
        q, k, v = (t.transpose(0, 2, 1, 3) for t in self.project(x, cos, sin))
        if past is not None:
            k, v = mx.concatenate([past[0], k], axis=2), mx.concatenate([past[1], v], axis=2)
        out = causal_attention(q, k, v, 1 / math.sqrt(self.head_dim), mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(*x.shape[:-1], -1)), k, v

    def think(
        self,
        x: mx.array,
        cos: mx.array,
        sin: mx.array,
        base_kv: tuple[mx.array, mx.array],
        cache: tuple[mx.array, mx.array] | None,
        mask_bias: mx.array,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Thought steps x (R, n, S, D) -> output, and the stream keys/values (R, m, S, h, d) incl. these steps."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = mx.concatenate([cache[0], k], axis=1), mx.concatenate([cache[1], v], axis=1)
        out = attention.thought_attention(OPS, q, k, v, *base_kv, mask_bias)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        return self.down_proj(gate * sigmoid(gate) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def finish(self, x: mx.array, attn: mx.array) -> mx.array:
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x: mx.array, *args: mx.array | tuple | None) -> tuple[mx.array, ...]:
        attn, k, v = self.self_attn.extend(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v

    def think(self, x: mx.array, *args: mx.array | tuple | None) -> tuple[mx.array, ...]:
        attn, (k, v) = self.self_attn.think(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Thought(nn.Module):
    """The <start>/<end> parameters; their input vectors are embedding_scale * parameter."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.start = mx.zeros((hidden,))
        self.end = mx.zeros((hidden,))


class Model(nn.Module):
    """A Llama-family causal LM plus the Quiet-STaR extras, implementing the core's `Backbone`."""

    def __init__(self, cfg: ModelConfig, embedding_scale: float) -> None:
        super().__init__()
        self.cfg, self.embedding_scale, self.ops = cfg, embedding_scale, MLXOps()
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.thought = Thought(cfg.hidden_size)
        h = cfg.hidden_size
        # A plain list (not nn.Sequential) so the names are mixing_head.0.weight, ... as in torch.
        self.mixing_head = [nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1, bias=False)]
        self.grad_checkpoint = False

    def run(self, layer: Block, fn: Callable[..., T], *args: Any) -> T:
        """Call a layer; with grad_checkpoint its activations are recomputed in backward instead of stored."""
        return nn.utils.checkpoint(layer, fn)(*args) if self.grad_checkpoint else fn(*args)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    def rope(self, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos/sin tables (..., d): float32 angles from the core, evaluated in float32 as transformers does."""
        angles = self.ops.asarray(rope_angles(self.cfg, positions))
        return mx.cos(angles).astype(self.dtype), mx.sin(angles).astype(self.dtype)

    def embed(self, ids: mx.array) -> mx.array:
        return self.model.embed_tokens(ids)

    def thought_vectors(self) -> tuple[mx.array, mx.array]:
        return self.embedding_scale * self.thought.start, self.embedding_scale * self.thought.end

    def base(self, ids: mx.array) -> tuple[mx.array, KV]:
        return self.extend(ids, None, None, None)

    def extend(
        self, ids: mx.array, positions: np.ndarray | None, key_mask: np.ndarray | None, cache: KV | None
    ) -> tuple[mx.array, KV]:
        past, n = (0 if cache is None else cache[0][0].shape[2]), ids.shape[1]
        if positions is None:
            positions = np.arange(past, past + n)[None]
        self.cfg.check_length(past + n)
        cos, sin = self.rope(positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        visible = extend_mask(past, n, key_mask)
        mask = None if visible is None else self.ops.asarray(visible)[:, None]
        x, kv = self.embed(ids), []
        for i, layer in enumerate(self.model.layers):
            x, k, v = self.run(layer, layer.extend, x, cos, sin, None if cache is None else cache[i], mask)
            kv.append((k, v))
        return self.model.norm(x), kv

    def think(self, x: mx.array, geometry: StepGeometry, base_kv: KV, cache: KV | None) -> tuple[mx.array, KV]:
        cos, sin = self.rope(geometry.positions)
        cos, sin = cos[..., None, :], sin[..., None, :]
        mask_bias = self.ops.asarray(attention.mask_bias(geometry))
        new_cache = []
        for i, layer in enumerate(self.model.layers):
            past = None if cache is None else cache[i]
            x, k, v = self.run(layer, layer.think, x, cos, sin, base_kv[i], past, mask_bias)
            new_cache.append((k, v))
        return self.model.norm(x), new_cache

    def logits(self, h: mx.array) -> mx.array:
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return h @ weight.T

    def mixing(self, base: mx.array, thought: mx.array) -> mx.array:
        x = mx.concatenate([base, thought], axis=-1)
        for layer in self.mixing_head:
            x = layer(x)
        return x[..., 0]
