"""The Llama family (llama, mistral, qwen2, qwen3) in PyTorch, with thought-aware attention.

Parameter names are Hugging Face's, so checkpoints load without renaming. `base` is the
ordinary causal pass; `think` runs thought steps of every stream at once with the core's split attention
(qstar/core/attention.py): no stream ever holds a copy of the prefix keys/values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar.core import attention
from qstar.core.hf_config import ModelConfig, rope_angles
from qstar.core.layout import StepGeometry, extend_mask
from qstar.torch_backend.ops import TorchOps

KV = list[tuple[torch.Tensor, torch.Tensor]]
T = TypeVar("T")
OPS = TorchOps()
"""For the split attention, whose ops (einsum, softmax, ...) follow their inputs' device."""


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) with float32 internals for every dtype, float64 included (what
    transformers and the reference compute), as one autograd node that keeps x and 1/rms instead of four
    full-size intermediates: thought steps run it k + 1 times per layer, so node count and memory add up."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.float() * inv_rms
        d_weight = (d_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        g = (d_out * weight).float()
        d_x = inv_rms * (g - normed * (g * normed).mean(-1, keepdim=True))
        return d_x.to(x.dtype), d_weight.to(weight.dtype), None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RotaryFunction(torch.autograd.Function):
    """RoPE, x * cos + rotate_half(x) * sin, as one autograd node: its backward, g * cos + rotate_half^T(g * sin), needs
    only cos and sin, where autograd would run the slices, negation and concatenation backwards (q and k pass through
    it once per layer and thought step)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        gs, half = g * sin, g.shape[-1] // 2
        return g * cos + torch.cat([gs[..., half:], -gs[..., :half]], dim=-1), None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(..., D) -> rotated q (..., H, d), k (..., h, d) and v (..., h, d)."""
        q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin), v

    def extend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal attention of (B, n, D) after `past` keys/values; returns the output and the keys/values
        (B, h, T, d) including the new tokens. mask None: plain causal attention without a past."""
        q, k, v = (t.transpose(1, 2) for t in self.project(x, cos, sin))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        gqa = self.heads != self.kv_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).flatten(-2)), k, v

    def think(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        base_kv: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        mask_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Thought steps x (R, n, S, D) -> output, and the stream keys/values (R, m, S, h, d) incl. these steps."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        out = attention.thought_attention(OPS, q, k, v, *base_kv, mask_bias)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x: torch.Tensor, *args: torch.Tensor | tuple | None) -> tuple[torch.Tensor, ...]:
        attn, k, v = self.self_attn.extend(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v

    def think(self, x: torch.Tensor, *args: torch.Tensor | tuple | None) -> tuple[torch.Tensor, ...]:
        attn, (k, v) = self.self_attn.think(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Thought(nn.Module):
    """The <start>/<end> parameters; their input vectors are embedding_scale * parameter."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.zeros(hidden))
        self.end = nn.Parameter(torch.zeros(hidden))


class Model(nn.Module):
    """A Llama-family causal LM plus the Quiet-STaR extras, implementing the core's `Backbone`."""

    def __init__(self, cfg: ModelConfig, embedding_scale: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg, self.embedding_scale, self.ops = cfg, embedding_scale, TorchOps(device)
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.thought = Thought(cfg.hidden_size)
        h = cfg.hidden_size
        self.mixing_head = nn.Sequential(
            nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1, bias=False)
        )
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grad_checkpoint = False
        self.think_layer: Callable[..., tuple[torch.Tensor, ...]] = Block.think

    def compile_thought_steps(self, backend: str = "inductor") -> None:
        """torch.compile the thought step of a layer (one graph serves every layer; sizes are dynamic): a thought step
        pushes few tokens through a couple of hundred small kernels, so on a GPU it is bound by kernel launches."""
        # Graphs: with and without grad x (no cache, a one-step cache, a longer one, the multi-step tail).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        self.think_layer = torch.compile(Block.think, dynamic=True, backend=backend)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a layer; with grad_checkpoint its activations are recomputed in backward instead of stored."""
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def rope(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (..., d) of integer positions: float32 angles from the core, evaluated in float32 as transformers
        does, kept as one table per position that grows on demand."""
        have = 0 if self._rope is None else self._rope[0].shape[0]
        if have <= positions.max() or self._rope[0].dtype != self.dtype:
            angles = self.ops.asarray(rope_angles(self.cfg, np.arange(max(2 * have, int(positions.max()) + 1, 256))))
            self._rope = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        index = self.ops.asarray(positions)
        return self._rope[0][index], self._rope[1][index]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def thought_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding_scale * self.thought.start, self.embedding_scale * self.thought.end

    def base(self, ids: torch.Tensor) -> tuple[torch.Tensor, KV]:
        return self.extend(ids, None, None, None)

    def extend(
        self, ids: torch.Tensor, positions: np.ndarray | None, key_mask: np.ndarray | None, cache: KV | None
    ) -> tuple[torch.Tensor, KV]:
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
            x, k, v = self.run(layer.extend, x, cos, sin, None if cache is None else cache[i], mask)
            kv.append((k, v))
        return self.model.norm(x), kv

    def think(self, x: torch.Tensor, geometry: StepGeometry, base_kv: KV, cache: KV | None) -> tuple[torch.Tensor, KV]:
        cos, sin = self.rope(geometry.positions)
        cos, sin = cos[..., None, :], sin[..., None, :]
        mask_bias = self.ops.asarray(attention.mask_bias(geometry))
        x, new_cache = x.contiguous(), []  # one memory layout for every layer's input (a compiled graph guards on it)
        for i, layer in enumerate(self.model.layers):
            past = None if cache is None else cache[i]
            x, k, v = self.run(self.think_layer, layer, x, cos, sin, base_kv[i], past, mask_bias)
            new_cache.append((k, v))
        return self.model.norm(x), new_cache

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return h @ weight.T

    def mixing(self, base: torch.Tensor, thought: torch.Tensor) -> torch.Tensor:
        return self.mixing_head(torch.cat([base, thought], dim=-1))[..., 0]
