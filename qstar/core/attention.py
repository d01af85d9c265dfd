"""Split thought attention, written once for every backend.

A thought query of stream p sees the base keys 0..p (shared by all streams, never copied) and its own stream's
thought keys, with one softmax over both. The layout is head-major, q (B, h, P, n, S, g, d), so that the base
part is one plain batched matmul per KV head over X = P*n*S*g query rows: no (..., L)-wide tensor is ever
permuted or copied (matmul takes the probabilities' base slice as a strided view, where einsum would copy it), and
autograd keeps the probabilities once.

Shapes: q (B, h, P, n, S, g, d), already scaled by 1/sqrt(d); base keys/values kb, vb (B, h, L, d); own
keys/values kt, vt (B, P, m, S, h, d); base_mask broadcastable to the (B, h, P, n, S, g, L) scores, own_mask to
(..., n, S, g, m).
"""

from __future__ import annotations

import math

import numpy as np

from qstar.core.layout import StepGeometry
from qstar.core.ops import Array, Ops

HEAD_MAJOR = (0, 4, 1, 2, 3, 5, 6)
"""(B, P, n, S, h, g, d) -> (B, h, P, n, S, g, d)."""
HEAD_MAJOR_INVERSE = tuple(int(i) for i in np.argsort(HEAD_MAJOR))


def masks(geometry: StepGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The geometry's base and own masks, shaped to broadcast against the head-major scores."""
    return geometry.base_mask[:, None, None, None, :, None, :], geometry.own_mask[:, None, None, :]


def thought_attention(
    ops: Ops, q: Array, k: Array, v: Array, kb: Array, vb: Array, base_mask: Array, own_mask: Array
) -> Array:
    """Attention of thought steps: q (R, n, S, H, d) against the base keys/values kb, vb (B, h, L, d) and the
    streams' own keys/values k, v (R, m, S, h, d), steps 1..m. Returns (R, n, S, H*d)."""
    batch, (rows, n, streams, heads, dim), kv_heads = kb.shape[0], q.shape, kb.shape[1]
    q = q.reshape(batch, rows // batch, n, streams, kv_heads, heads // kv_heads, dim) / math.sqrt(dim)
    kt = k.reshape(batch, rows // batch, *k.shape[1:])
    vt = v.reshape(batch, rows // batch, *v.shape[1:])
    out = split_attention(ops, ops.transpose(q, HEAD_MAJOR), kb, vb, kt, vt, base_mask, own_mask)
    return ops.transpose(out, HEAD_MAJOR_INVERSE).reshape(rows, n, streams, heads * dim)


def rows(x: Array) -> Array:
    """(B, h, P, n, S, g, c) -> (B, h, X, c)."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def split_attention(
    ops: Ops, q: Array, kb: Array, vb: Array, kt: Array, vt: Array, base_mask: Array, own_mask: Array
) -> Array:
    """Output (B, h, P, n, S, g, d); the softmax runs in at least float32."""
    length = kb.shape[2]
    s_base = (rows(q) @ kb.swapaxes(-1, -2)).reshape(*q.shape[:-1], length)
    s_own = ops.einsum("bhpnsgd,bpmshd->bhpnsgm", q, kt)
    scores = ops.concat([ops.where(base_mask, s_base, float("-inf")), ops.where(own_mask, s_own, float("-inf"))], -1)
    probs = ops.astype(ops.softmax(ops.upcast(scores), axis=-1), q.dtype)
    out = (rows(probs[..., :length]) @ vb).reshape(q.shape)
    return out + ops.einsum("bhpnsgm,bpmshd->bhpnsgd", probs[..., length:], vt)
