"""The core's network (qstar/core/decoder.py) on torch modules.

Parameter names are Hugging Face's, so checkpoints load without renaming. What is PyTorch's own: RMSNorm and RoPE
as one autograd node each, SDPA for the causal pass, activation checkpointing and the opt-in torch.compile of a
layer's thought step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar.core import decoder, thinker
from qstar.core.layout import StepGeometry
from qstar.core.model_config import ModelConfig
from qstar.torch_backend.ops import TorchOps

ROPE_TABLE_MIN = 256
LAYER_METHODS = ("extend", "think")
"""How the core calls a decoder layer (qstar/core/decoder.py)."""
MAX_PLACED = 64
"""Placed geometries kept (a layout's steps, and generation's)."""
OPS = TorchOps()
"""The ops of the layers' split attention, whose operations (einsum, softmax, ...) follow their inputs' device."""
FLEX: Any = None
"""flex_attention compiled, made on first use on CUDA."""


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


class Attention(nn.Module, decoder.Attention):
    ops = OPS

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.build(cfg, index, MODULES)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return RotaryFunction.apply(x, cos, sin)

    def think(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        base_kv: decoder.KV,
        cache: decoder.Chunks | decoder.KV | None,
        bias: torch.Tensor | FlexBias,
        slot: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The core's thought attention, or FlexAttention (Backbone.attention = "flex") for a pass over all steps."""
        if not isinstance(bias, FlexBias):
            return super().think(x, cos, sin, base_kv, cache, bias, slot)
        if cache is not None or slot is not None:  # a step on top of a cache: split attention
            return super().think(x, cos, sin, base_kv, cache, bias.dense, slot)
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(flex_thought_attention(q, k, v, *base_kv, bias)), k, v

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gqa = self.num_heads != self.num_kv_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


@dataclass(frozen=True)
class FlexBias:
    """A thought geometry for FlexAttention: the block mask over a row's [base keys, own keys stream by stream] and,
    for the steps that attend on top of a cache, the split attention's additive bias."""

    dense: torch.Tensor
    block_mask: Any


def flex_block_mask(base_mask: torch.Tensor, own_mask: torch.Tensor, device: torch.device) -> Any:
    """Visibility of a thought row's queries, stream by stream (query q = stream * n + step), over its keys: the
    base keys 0..L-1 (base_mask (S, L)), then the own keys stream by stream (L + stream * m + key step, own_mask (n, m)
    within a stream, nothing across streams)."""
    from torch.nn.attention.flex_attention import create_block_mask

    (streams, length), (n, m) = base_mask.shape, own_mask.shape

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        stream, step, own = q // n, q % n, (kv - length).clamp(min=0)
        base = base_mask[stream, kv.clamp(max=length - 1)]
        return torch.where(kv < length, base, (own // m == stream) & own_mask[step, own % m])

    return create_block_mask(mask_mod, None, None, streams * n, length + streams * m, device=device)


def flex_thought_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, bias: FlexBias
) -> torch.Tensor:
    """What core.attention.thought_attention computes, as one FlexAttention call per thought row: q (R, n, S, H, d),
    own k, v (R, m, S, h, d), base kb, vb (B, h, L, d) -> (R, n, S, H*d). The base keys are repeated once per
    thought row of a sequence (P times), never per position."""
    from torch.nn.attention.flex_attention import flex_attention

    rows, n, streams, heads, dim = q.shape
    kv_heads = kb.shape[1]

    def stream_major(t: torch.Tensor) -> torch.Tensor:  # (R, steps, S, h, d) -> (R, h, S * steps, d)
        return t.permute(0, 3, 2, 1, 4).reshape(rows, t.shape[3], streams * t.shape[1], dim)

    repeat = rows // kb.shape[0]
    keys = torch.cat([kb.repeat_interleave(repeat, dim=0), stream_major(k)], dim=2)
    values = torch.cat([vb.repeat_interleave(repeat, dim=0), stream_major(v)], dim=2)
    global FLEX
    if q.is_cuda and FLEX is None:
        FLEX = torch.compile(flex_attention, dynamic=False)
    attend = FLEX if q.is_cuda else flex_attention  # compiled on CUDA, where it is one kernel; eager elsewhere
    with warnings.catch_warnings():
        # Eager on a CPU by choice: there it serves to check FlexAttention against the split attention, and compiling
        # it would take minutes for nothing; torch's notice that an eager call is unfused says what we chose.
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
        out = attend(
            stream_major(q), keys, values, block_mask=bias.block_mask, scale=dim**-0.5, enable_gqa=heads != kv_heads
        )
    return out.reshape(rows, heads, streams, n, dim).permute(0, 3, 2, 1, 4).reshape(rows, n, streams, heads * dim)


class MLP(nn.Module, decoder.MLP):
    ops = OPS
    forward = decoder.MLP.forward  # nn.Module's own placeholder comes first in the MRO

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
    layer_list=nn.ModuleList,
    module=nn.Module,
    zeros=lambda n: nn.Parameter(torch.zeros(n)),
    attention=Attention,
    mlp=MLP,
    block=Block,
)


class Backbone(nn.Module, decoder.Backbone):
    ops: TorchOps

    def __init__(self, cfg: ModelConfig, embedding_scale: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.ops = TorchOps(device)
        self.build(cfg, embedding_scale, MODULES)
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grad_checkpoint = False
        self.compiled_think: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self.compiled_loop: Callable[..., torch.Tensor] | None = None
        self.attention = "split"
        """"split" (qstar/core/attention.py) or "flex": FlexAttention for the passes over all thought steps (CUDA)."""
        self.placed: dict[tuple[str | bytes, ...], decoder.Placed] = {}

    def compile_thought_steps(self, backend: str = "inductor") -> None:
        """torch.compile the thought step of a layer (one graph serves every layer; sizes are dynamic): a thought step
        pushes few tokens through a couple of hundred small kernels, so on a GPU it is bound by kernel launches."""
        # Graphs: with and without grad x (no cache, a preallocated one, and in one-pass steps a cache of each number
        # of step chunks, 1..k, then the multi-step tail).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(decoder.Block.think, dynamic=True, backend=backend)

        def think(layer: Block, x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
            return compiled(layer, x.contiguous(), *args)  # one memory layout for every input: the graph guards on it

        self.compiled_think = think

    def place(self, geometry: StepGeometry) -> decoder.Placed:
        """The core's placed geometry, kept per geometry (the same every step); with attention "flex", a geometry
        shared by all rows also gets its FlexAttention block mask."""
        arrays = (geometry.positions, geometry.base_mask, geometry.own_mask)
        key: tuple[str | bytes, ...] = (self.attention, *(a.tobytes() + str(a.shape).encode() for a in arrays))
        if key not in self.placed:
            placed = super().place(geometry)
            if self.attention == "flex" and geometry.base_mask.shape[0] == 1:
                masks = self.ops.constant(geometry.base_mask[0]), self.ops.constant(geometry.own_mask)
                flex = FlexBias(placed.bias, flex_block_mask(*masks, self.ops.device))
                placed = decoder.Placed(placed.cos, placed.sin, flex)
            self.placed[key] = placed
            if len(self.placed) > MAX_PLACED:
                self.placed.pop(next(iter(self.placed)))
        return self.placed[key]

    def rope(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """From one cos/sin table per model kept on the device and grown on demand, so that a call gathers rows
        instead of copying angles to the device."""
        table, needed = self.rope_table, int(positions.max()) + 1
        if table is None or table[0].shape[0] < needed or table[0].dtype != self.dtype:
            have = 0 if table is None else table[0].shape[0]
            table = self.rope_table = super().rope(np.arange(max(2 * have, needed, ROPE_TABLE_MIN)))
        index = self.ops.constant(positions)
        return table[0][index], table[1][index]

    def compile_sampling_loop(self, backend: str = "inductor") -> None:
        """torch.compile the thinker's sampling loop whole (fullgraph: it has no graph break); on CUDA as CUDA graphs
        (mode "reduce-overhead"), replayed every step: the k steps' kernels launch as one."""
        mode = "reduce-overhead" if self.ops.device.type == "cuda" and backend == "inductor" else None
        loop = thinker.sampling_loop
        self.compiled_loop = torch.compile(loop, fullgraph=True, dynamic=False, mode=mode, backend=backend)

    def call_loop(self, loop: Callable[..., torch.Tensor], *args: Any, capturable: bool = True) -> torch.Tensor:
        """Compiled where the noise is the device's generator; keyed noise (a seeded evaluation or control during a
        compiled run) takes the eager loop, the same draws."""
        return (self.compiled_loop if capturable and self.compiled_loop else loop)(*args)

    def call_layer(self, layer: decoder.Block, method: str, *args: Any) -> tuple[torch.Tensor, ...]:
        """Through the layer's own (bound) method, which FSDP2 wraps to all-gather its weights."""
        compiled = self.compiled_think if method == "think" else None
        fn = partial(compiled, layer) if compiled else getattr(layer, method)
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
