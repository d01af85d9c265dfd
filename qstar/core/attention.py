"""Split thought attention, written once for every backend.

A thought query of stream p sees the base keys 0..p (shared by all streams, never copied) and its own stream's
thought keys, with one softmax over both. The layout is head-major, q (B, h, P, n, S, g, d), so that the base
part is one plain batched matmul per KV head over X = P*n*S*g query rows: no (..., L)-wide tensor is ever
permuted or copied (matmul takes the probabilities' base slice as a strided view, where einsum would copy it), and
autograd keeps the probabilities once.

Shapes: q (B, h, P, n, S, g, d), already scaled by 1/sqrt(d); base keys/values kb, vb (B, h, L, d); own
keys/values kt, vt (B, P, m, S, h, d); the mask bias broadcastable to the (B, h, P, n, S, g, L+m) scores over the
concatenated [base, own] keys.
"""

from __future__ import annotations

import math

import numpy as np

from qstar.core.layout import StepGeometry
from qstar.core.ops import Array, Ops

HEAD_MAJOR = (0, 4, 1, 2, 3, 5, 6)
"""(B, P, n, S, h, g, d) -> (B, h, P, n, S, g, d)."""
HEAD_MAJOR_INVERSE = tuple(int(i) for i in np.argsort(HEAD_MAJOR))


def mask_bias(geometry: StepGeometry) -> np.ndarray:
    """The geometry's visibility as one additive float32 bias, 0 (seen) or -inf, over the concatenated [base, own]
    keys, shaped (B|1, 1, 1, n, S|1, 1, L+m) for the head-major scores: one add instead of masking each part
    (two selects forward, two more backward), and bit-identical to it."""
    base, own = geometry.base_mask[:, None], geometry.own_mask[None, :, None]  # (B|1, 1, S|1, L), (1, n, 1, m)
    rows, n, streams = base.shape[0], own.shape[1], base.shape[2]
    visible = np.concatenate(
        [
            np.broadcast_to(base, (rows, n, streams, base.shape[-1])),
            np.broadcast_to(own, (rows, n, streams, own.shape[-1])),
        ],
        axis=-1,
    )
    return np.where(visible, 0.0, -np.inf).astype(np.float32)[:, None, None, :, :, None, :]


def thought_attention(ops: Ops, q: Array, k: Array, v: Array, kb: Array, vb: Array, bias: Array) -> Array:
    """Attention of thought steps: q (R, n, S, H, d) against the base keys/values kb, vb (B, h, L, d) and the
    streams' own keys/values k, v (R, m, S, h, d), steps 1..m, under `mask_bias`. Returns (R, n, S, H*d)."""
    batch, (rows, n, streams, heads, dim), kv_heads = kb.shape[0], q.shape, kb.shape[1]
    q = q.reshape(batch, rows // batch, n, streams, kv_heads, heads // kv_heads, dim) / math.sqrt(dim)
    kt = k.reshape(batch, rows // batch, *k.shape[1:])
    vt = v.reshape(batch, rows // batch, *v.shape[1:])
    out = split_attention(ops, ops.transpose(q, HEAD_MAJOR), kb, vb, kt, vt, bias)
    return ops.transpose(out, HEAD_MAJOR_INVERSE).reshape(rows, n, streams, heads * dim)


def rows(x: Array) -> Array:
    """(B, h, P, n, S, g, c) -> (B, h, X, c)."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def split_attention(ops: Ops, q: Array, kb: Array, vb: Array, kt: Array, vt: Array, bias: Array) -> Array:
    """Output (B, h, P, n, S, g, d); the softmax runs in at least float32."""
    length = kb.shape[2]
    s_base = (rows(q) @ kb.swapaxes(-1, -2)).reshape(*q.shape[:-1], length)
    s_own = ops.einsum("bhpnsgd,bpmshd->bhpnsgm", q, kt)
    scores = ops.upcast(ops.concat([s_base, s_own], -1)) + bias
    probs = ops.astype(ops.softmax(scores, axis=-1), q.dtype)
    out = (rows(probs[..., :length]) @ vb).reshape(q.shape)
    return out + ops.einsum("bhpnsgm,bpmshd->bhpnsgd", probs[..., length:], vt)
