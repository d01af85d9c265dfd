"""Quiet-STaR loss math, written once against `Ops`: NLLs, mixing, rewards, advantages, policy loss."""

from __future__ import annotations

from qstar.core.ops import Array, Ops
from qstar.core.recipe import Recipe
from qstar.core.sampling import allowed, scaled


def picked(ops: Ops, z: Array, targets: Array) -> Array:
    """log softmax(z)[target] over the last axis, through a fused log-softmax: z[target] - logsumexp(z) would run
    several more passes over the (..., V) logits, forward and backward, every thought step."""
    return ops.take_along_axis(ops.log_softmax(z, axis=-1), targets[..., None], axis=-1)[..., 0]


def token_nll(ops: Ops, logits: Array, targets: Array) -> Array:
    """-log softmax(logits)[target], accumulated in at least float32."""
    return -picked(ops, ops.upcast(logits), targets)


def token_logprob(ops: Ops, logits: Array, targets: Array, banned: Array | None, temperature: float) -> Array:
    """log softmax(logits / T)[target] with banned ids excluded (the policy's log-probability of a draw)."""
    return picked(ops, scaled(allowed(ops, logits, banned), temperature), targets)


def entropy(ops: Ops, logits: Array, banned: Array | None, temperature: float) -> Array:
    """Entropy in nats (...) of softmax(logits / T) (..., V) over the allowed ids: logsumexp(z) - sum p z, with the
    banned ids' z read as 0 where p is 0 (-inf times 0 would be NaN, forward and backward)."""
    z = scaled(ops.upcast(logits), temperature)
    free = allowed(ops, z, banned)
    finite = z if banned is None else ops.where(banned, 0.0, z)
    return ops.logsumexp(free, axis=-1) - ops.sum(ops.softmax(free, axis=-1) * finite, axis=-1)


def mix(ops: Ops, recipe: Recipe, head_out: Array) -> Array:
    """Mixing weight w of the thought side: the raw head output ("hidden") or its sigmoid."""
    return ops.sigmoid(head_out) if recipe.mixing == "logits-sigmoid" else head_out


def masked_mean(ops: Ops, x: Array, weight: Array | None) -> Array:
    """Mean over the entries of weight 1 (padding excluded); None: no padding, a plain mean. In a data-parallel run
    the denominator is the count over all ranks, divided by their number: the mean of the ranks' gradients is then
    the gradient of the global mean, however the padding falls."""
    if weight is None:
        return ops.mean(x)
    return ops.sum(x * weight) / (ops.maximum(ops.all_sum(ops.sum(weight)), 1.0) / ops.ranks)


def group_advantage(ops: Ops, reward: Array, group: int, clamp: bool) -> Array:
    """reward - mean over the `group` thoughts of the same sequence and position (rows b*P + p)."""
    rows, n = reward.shape
    grouped = reward.reshape(rows // group, group, n)
    advantage = (grouped - ops.mean(grouped, axis=1)[:, None, :]).reshape(rows, n)
    return ops.maximum(advantage, 0.0) if clamp else advantage


def lm_loss(recipe: Recipe, base_mean: Array, talk_means: list[Array]) -> Array:
    """base_w * mean NLL without thought + (1 - base_w) / A * sum_j mean NLL of the mixed prediction j."""
    return recipe.base_loss_weight * base_mean + (1 - recipe.base_loss_weight) / recipe.lookahead * sum(
        talk_means[1:], talk_means[0]
    )


def policy_loss(ops: Ops, advantage: Array, logprobs: Array, weight: Array | None) -> Array:
    """REINFORCE: mean over thought tokens k and rewarded entries of -advantage * log pi(t_k).

    advantage (R, n), logprobs (R, k, n), weight (R, n) or None."""
    return masked_mean(ops, ops.mean(-advantage[:, None, :] * logprobs, axis=1), weight)
