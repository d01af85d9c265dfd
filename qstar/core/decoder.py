"""The decoder-only transformer of every supported family (qstar/core/model_config.py) with thought-aware attention,
written once for every backend.

A backend subclasses each class here together with its framework's module class (`class Attention(nn.Module,
decoder.Attention)`), hands over its layer classes (`Modules`: Linear, RMSNorm, Embedding, ...), and supplies the few
primitives that differ between frameworks: `rotate`, `causal` and `call_layer`. Everything else, the network's
structure under Hugging Face's parameter names, each layer's shape, the projections, the two kinds of pass and the
layer loop, lives here, so that the backends build and compute the same thing.

Two passes over the layers:
- `extend`: ordinary causal attention of new tokens on top of a cache (the base pass is `extend` from nothing);
- `think`: thought steps of every stream at once, with the core's split attention (qstar/core/attention.py): no
  stream ever holds a copy of the prefix keys/values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from qstar.core import attention
from qstar.core.layout import StepGeometry, extend_mask
from qstar.core.model_config import ModelConfig, rope_angles
from qstar.core.ops import Array, Ops

KV = tuple[Array, Array]
Cache = list[KV]
"""Per layer (keys, values): (B, h, T, d) for the causal pass, (R, m, S, h, d) for a preallocated thought stream."""
Chunks = tuple[tuple[Array, ...], tuple[Array, ...]]
"""A layer's thought-stream keys and values, chunk by chunk as the steps made them (R, n_i, S, h, d)."""
StreamCache = list[Chunks]
Layer = Callable[[Array], Array]


@dataclass(frozen=True)
class Modules:
    """A framework's layer classes, from which the core builds the network."""

    linear: Callable[..., Layer]
    """Linear(in, out, bias=True)."""
    norm: Callable[[int, float], Layer]
    """RMSNorm(dim, eps)."""
    embedding: Callable[[int, int], Any]
    relu: Callable[[], Layer]
    layer_list: Callable[[list[Any]], Any]
    """A list of modules whose parameters the container holds (torch's ModuleList)."""
    module: Callable[[], Any]
    """An empty module to hold named parameters and modules."""
    zeros: Callable[[int], Any]
    """A trainable parameter (n,) of zeros."""
    attention: Callable[[ModelConfig, int], Any]
    mlp: Callable[[ModelConfig, int], Any]
    block: Callable[[ModelConfig, int], Any]


class Attention(ABC):
    """Attention with grouped keys/values (GQA), optional q/k RMSNorm (qwen3) and RoPE."""

    ops: Ops
    cfg: ModelConfig
    num_heads: int
    num_kv_heads: int
    q_proj: Layer
    k_proj: Layer
    v_proj: Layer
    o_proj: Layer
    q_norm: Layer
    k_norm: Layer

    def build(self, cfg: ModelConfig, index: int, m: Modules) -> None:
        """The projections of decoder layer `index` under Hugging Face's names."""
        shape, d, hd = cfg.layer(index), cfg.hidden_size, cfg.head_dim
        self.cfg, self.num_heads, self.num_kv_heads = cfg, shape.num_heads, shape.num_kv_heads
        self.q_proj = m.linear(d, shape.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = m.linear(d, shape.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = m.linear(d, shape.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = m.linear(shape.num_heads * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = m.norm(hd, cfg.rms_norm_eps)
            self.k_norm = m.norm(hd, cfg.rms_norm_eps)

    @abstractmethod
    def rotate(self, x: Array, cos: Array, sin: Array) -> Array:
        """RoPE in the rotate-half convention: x * cos + rotate_half(x) * sin."""

    @abstractmethod
    def causal(self, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
        """softmax(q k^T / sqrt(d), masked) v for q (B, H, n, d) and grouped k, v (B, h, T, d); mask (B|1, 1, n, T)
        bool, None = causal without a past."""

    def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """(..., D) -> rotated q (..., H, d), k (..., h, d) and v (..., h, d)."""
        lead, cfg = tuple(x.shape[:-1]), self.cfg
        q = self.q_proj(x).reshape(*lead, self.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(*lead, self.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(*lead, self.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin), v

    def extend(
        self, x: Array, cos: Array, sin: Array, past: KV | None, mask: Array | None
    ) -> tuple[Array, Array, Array]:
        """Causal attention of (B, n, D) after `past` keys/values; returns the output and the keys/values (B, h, T, d)
        including the new tokens."""
        ops = self.ops
        q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in self.project(x, cos, sin))
        if past is not None:
            k, v = ops.concat([past[0], k], axis=2), ops.concat([past[1], v], axis=2)
        out = ops.transpose(self.causal(q, k, v, mask), (0, 2, 1, 3))
        return self.o_proj(out.reshape(*x.shape[:-1], -1)), k, v

    def think(
        self,
        x: Array,
        cos: Array,
        sin: Array,
        base_kv: KV,
        cache: Chunks | KV | None,
        bias: Array,
        slot: int | None = None,
    ) -> tuple[Array, Array, Array]:
        """Thought steps x (R, n, S, D) -> output and these steps' own keys/values (R, n, S, h, d), attending to the
        earlier steps' chunks of `cache`, concatenated here: a layer recomputed in backward (grad_checkpoint) then
        keeps each step's keys/values once instead of every step's concatenation (O(k^2)). With `slot`, the cache is
        preallocated (R, m, S, h, d) and these steps' keys/values are written into it at slot, slot+1, ... (no
        gradient; the bias hides the slots not written yet): every step has the same shapes."""
        q, k, v = self.project(x, cos, sin)
        keys, values = k, v
        if slot is not None and cache is not None:
            n, (keys, values) = k.shape[1], cast(KV, cache)
            keys[:, slot : slot + n], values[:, slot : slot + n] = k, v
        elif cache is not None:
            keys, values = self.ops.concat([*cache[0], k], axis=1), self.ops.concat([*cache[1], v], axis=1)
        out = attention.thought_attention(self.ops, q, keys, values, *base_kv, bias)
        return self.o_proj(out), k, v


class MLP:
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    ops: Ops
    gate_proj: Layer
    up_proj: Layer
    down_proj: Layer

    def build(self, cfg: ModelConfig, index: int, m: Modules) -> None:
        width = cfg.layer(index).intermediate_size
        self.gate_proj = m.linear(cfg.hidden_size, width, bias=False)
        self.up_proj = m.linear(cfg.hidden_size, width, bias=False)
        self.down_proj = m.linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: Array) -> Array:
        return self.down_proj(self.ops.silu(self.gate_proj(x)) * self.up_proj(x))

    __call__ = forward  # MLX calls a module; torch's nn.Module.__call__ calls forward


class Block:
    """Pre-norm decoder layer: x + attention(norm(x)), then + mlp(norm(.))."""

    input_layernorm: Layer
    post_attention_layernorm: Layer
    self_attn: Attention
    mlp: Layer

    def build(self, cfg: ModelConfig, index: int, m: Modules) -> None:
        self.input_layernorm = m.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = m.attention(cfg, index)
        self.post_attention_layernorm = m.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = m.mlp(cfg, index)

    def finish(self, x: Array, attn: Array) -> Array:
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x: Array, *args: Any) -> tuple[Array, Array, Array]:
        attn, k, v = self.self_attn.extend(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v

    def think(self, x: Array, *args: Any) -> tuple[Array, Array, Array]:
        attn, k, v = self.self_attn.think(self.input_layernorm(x), *args)
        return self.finish(x, attn), k, v


@dataclass(frozen=True)
class Placed:
    """A StepGeometry on the device, as the layers consume it: cos/sin (B|1, n, S, 1, d) and the mask bias."""

    cos: Array
    sin: Array
    bias: Array


class Backbone(ABC):
    """A causal LM plus the Quiet-STaR extras (<start>/<end> vectors, mixing head): what the core's
    algorithm (thinker, generate) computes with. Shapes: B rows, L tokens, R = B*P thought rows, S streams,
    n steps, D hidden, V vocabulary."""

    ops: Ops
    cfg: ModelConfig
    embedding_scale: float
    model: Any
    """HF's `model.`: embed_tokens, layers, norm."""
    lm_head: Any
    """A Linear without bias; its weight is used (untied checkpoints)."""
    thought: Any
    """start and end parameters (D,)."""
    mixing_head: Iterable[Layer]

    def build(self, cfg: ModelConfig, embedding_scale: float, m: Modules) -> None:
        """The network under Hugging Face's names (`model.embed_tokens`, `model.layers.N...`, `model.norm`, `lm_head`
        unless tied), plus the thought vectors and the mixing head Linear(2D, D) -> ReLU -> Linear(D, D) -> ReLU ->
        Linear(D, 1) as `mixing_head.0/2/4`."""
        d = cfg.hidden_size
        self.cfg, self.embedding_scale = cfg, embedding_scale
        self.model = m.module()
        self.model.embed_tokens = m.embedding(cfg.vocab_size, d)
        self.model.layers = m.layer_list([m.block(cfg, i) for i in range(cfg.num_layers)])
        self.model.norm = m.norm(d, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = m.linear(d, cfg.vocab_size, bias=False)
        self.thought = m.module()
        self.thought.start, self.thought.end = m.zeros(d), m.zeros(d)
        head = [m.linear(2 * d, d), m.relu(), m.linear(d, d), m.relu(), m.linear(d, 1, bias=False)]
        self.mixing_head = m.layer_list(head)

    @abstractmethod
    def call_layer(self, layer: Block, method: str, *args: Any) -> tuple[Array, ...]:
        """layer.<method>(*args), where a backend may recompute activations in backward (grad_checkpoint) or run a
        compiled version."""

    def call_loop(self, loop: Callable[..., Array], *args: Any, capturable: bool = True) -> Array:
        """loop(*args): the thinker's sampling loop, which a backend may run compiled (captured whole) where it is
        `capturable` (its noise the device's generator)."""
        return loop(*args)

    @property
    def dtype(self) -> Any:
        return self.model.norm.weight.dtype

    def rope(self, positions: np.ndarray) -> tuple[Array, Array]:
        """cos/sin (*positions.shape, d) of integer positions: float32 angles evaluated in float32, then cast, as
        transformers does."""
        ops = self.ops
        angles = ops.constant(rope_angles(self.cfg, positions, ops.power))  # a step's positions repeat every step
        return ops.astype(ops.cos(angles), self.dtype), ops.astype(ops.sin(angles), self.dtype)

    def embed(self, ids: Array) -> Array:
        """Token embeddings (..., D)."""
        return self.model.embed_tokens(ids)

    def thought_vectors(self) -> tuple[Array, Array]:
        """Input vectors (D,) of <start> and <end>, embedding_scale already applied."""
        return self.embedding_scale * self.thought.start, self.embedding_scale * self.thought.end

    def base(self, ids: Array) -> tuple[Array, Cache]:
        """Causal pass over (B, L) ids: final-norm hidden (B, L, D) and every layer's keys/values."""
        return self.extend(ids, None, None, None)

    def extend(
        self, ids: Array, positions: np.ndarray | None, key_mask: np.ndarray | None, cache: Cache | None
    ) -> tuple[Array, Cache]:
        """Causal pass of (B, n) new tokens on top of `cache` (None: a fresh sequence): final-norm hidden (B, n, D)
        and the cache extended by them. positions (B|1, n) default to continuing the cache; key_mask (B, T_total)
        hides left padding."""
        past, n = (0 if cache is None else cache[0][0].shape[2]), ids.shape[1]
        if positions is None:
            positions = np.arange(past, past + n)[None]
        self.cfg.check_length(int(positions.max()) + 1)  # positions, not the cache: left padding lengthens that
        cos, sin = self.rope(positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        visible = extend_mask(past, n, key_mask)
        mask = None if visible is None else self.ops.asarray(visible)[:, None]
        x, kv = self.embed(ids), []
        for i, layer in enumerate(self.model.layers):
            x, k, v = self.call_layer(layer, "extend", x, cos, sin, None if cache is None else cache[i], mask)
            kv.append((k, v))
        return self.model.norm(x), kv

    def place(self, geometry: StepGeometry) -> Placed:
        """The geometry's RoPE tables and mask bias on the device."""
        cos, sin = self.rope(geometry.positions)
        return Placed(cos[..., None, :], sin[..., None, :], self.ops.constant(attention.mask_bias(geometry)))

    def think(
        self,
        x: Array,
        geometry: StepGeometry | Placed,
        base_kv: Cache,
        cache: StreamCache | Cache | None,
        slot: int | None = None,
    ) -> tuple[Array, StreamCache]:
        """Thought steps for inputs x (R, n, S, D) placed by `geometry` (or its placed form): final-norm hidden
        (R, n, S, D) and the stream cache extended by these steps' chunks (with `slot`, written into the preallocated
        cache instead, see Attention.think; nothing returned)."""
        placed = geometry if isinstance(geometry, Placed) else self.place(geometry)
        chunks: StreamCache = []
        for i, layer in enumerate(self.model.layers):
            past = None if cache is None else cache[i]
            x, k, v = self.call_layer(layer, "think", x, placed.cos, placed.sin, base_kv[i], past, placed.bias, slot)
            if slot is None:
                chunks.append(((k,), (v,)) if past is None else ((*past[0], k), (*past[1], v)))
        return self.model.norm(x), chunks

    def logits(self, h: Array) -> Array:
        """Logits (..., V)."""
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return h @ weight.T

    def mixing(self, base: Array, thought: Array) -> Array:
        """Raw mixing-head output (...) from concat[base, thought] hidden states (..., 2D)."""
        x = self.ops.concat([base, thought], axis=-1)
        for layer in self.mixing_head:
            x = layer(x)
        return x[..., 0]
