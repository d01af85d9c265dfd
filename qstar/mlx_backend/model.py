"""The Llama family in MLX: the core's model (qstar/core/llama.py) on mlx.nn modules.

Parameter names are Hugging Face's (and mlx-lm's), so checkpoints load without renaming. What is MLX's own:
RMSNorm, RoPE and the causal attention (mx.fast kernels, float64-accurate fallbacks), activation checkpointing.
"""

from __future__ import annotations

import math
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from qstar.core import llama
from qstar.core.hf_config import ModelConfig
from qstar.mlx_backend.ops import MLXOps, sigmoid, softmax

OPS = MLXOps()


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


class Attention(nn.Module, llama.Attention):
    ops = OPS

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def rotate(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = x.shape[-1] // 2
        return x * cos + mx.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    def causal(self, q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
        """float64 avoids mx.fast, whose softmax is only float32-accurate (see ops.py)."""
        scale = 1 / math.sqrt(self.cfg.head_dim)
        if q.dtype != mx.float64:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if mask is None else mask)
        batch, heads, n, dim = q.shape
        q = q.reshape(batch, k.shape[1], heads // k.shape[1], n, dim) * scale
        scores = q @ k[:, :, None].swapaxes(-1, -2)
        visible = mx.tril(mx.ones((n, n), dtype=mx.bool_)) if mask is None else mask[:, :, None]
        probs = softmax(mx.where(visible, scores, float("-inf")))
        return (probs @ v[:, :, None]).reshape(batch, heads, n, dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        return self.down_proj(gate * sigmoid(gate) * self.up_proj(x))


class Block(nn.Module, llama.Block):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


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


class Model(nn.Module, llama.Model):
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

    def logits(self, h: mx.array) -> mx.array:
        """Logits (..., V) through the head layer itself, which may be quantized (QLoRA), not its weight."""
        return self.model.embed_tokens.as_linear(h) if self.cfg.tie_word_embeddings else self.lm_head(h)

    def quantize(self, bits: int, group_size: int) -> None:
        """Quantize the base model's Linear and Embedding layers in place, those whose rows split into whole groups
        (mlx-lm's rule, so that its loader, which looks for `.scales`, rebuilds the same layers); the mixing head
        stays."""

        def chosen(path: str, m: nn.Module) -> bool:
            return (
                hasattr(m, "to_quantized")
                and not path.startswith("mixing_head")
                and m.weight.shape[-1] % group_size == 0
            )

        nn.quantize(self, group_size, bits, class_predicate=chosen)

    def call_layer(self, layer: llama.Block, method: str, *args: Any) -> tuple[mx.array, ...]:
        fn = getattr(layer, method)
        return nn.utils.checkpoint(cast(nn.Module, layer), fn)(*args) if self.grad_checkpoint else fn(*args)
