"""The core's network (qstar/core/decoder.py) on mlx.nn modules.

Parameter names are Hugging Face's (and mlx-lm's), so checkpoints load without renaming. What is MLX's own:
RMSNorm, RoPE and the causal attention (mx.fast kernels, float64-accurate fallbacks), activation checkpointing.
"""

from __future__ import annotations

import math
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from qstar.core import decoder
from qstar.core.model_config import ModelConfig
from qstar.mlx_backend.ops import MLXOps, softmax

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


class Attention(nn.Module, decoder.Attention):
    ops = OPS

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.build(cfg, index, MODULES)

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


class MLP(nn.Module, decoder.MLP):
    ops = OPS

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.build(cfg, index, MODULES)


class Block(nn.Module, decoder.Block):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.build(cfg, index, MODULES)


MODULES = decoder.Modules(
    linear=nn.Linear,
    norm=RMSNorm,
    embedding=nn.Embedding,
    relu=nn.ReLU,
    layer_list=list,  # plain lists: MLX names their entries .0, .1, ... as torch's ModuleList does
    module=nn.Module,
    zeros=lambda n: mx.zeros((n,)),
    attention=Attention,
    mlp=MLP,
    block=Block,
)


class Backbone(nn.Module, decoder.Backbone):
    def __init__(self, cfg: ModelConfig, embedding_scale: float) -> None:
        super().__init__()
        self.ops = MLXOps()
        self.build(cfg, embedding_scale, MODULES)
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

    def call_layer(self, layer: decoder.Block, method: str, *args: Any) -> tuple[mx.array, ...]:
        fn = getattr(layer, method)
        checkpointed = self.grad_checkpoint and cast(MLXOps, self.ops).recording  # as torch: never under no_grad
        return nn.utils.checkpoint(cast(nn.Module, layer), fn)(*args) if checkpointed else fn(*args)
