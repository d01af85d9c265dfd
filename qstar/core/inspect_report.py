"""Where thinking helped: a self-contained HTML page (and a terminal line) from per-token log-probs.

`qstar inspect` scores every token of a text twice, without thoughts (base) and with the thought sampled before it
(thoughtful); the gain thought_logprob - base_logprob (nats) says how much the thought helped predict the token.
A token without a score (e.g. the first one, which nothing predicts) has NaN log-probs: it is shown uncoloured and
left out of the summary.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOP = 5
SATURATION_QUANTILE = 0.95
"""Gains at or beyond this quantile of |gain| get full colour, so that one outlier does not wash out the rest."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #111; }
h1 { font-size: 1.3em; margin-bottom: 0.3em; }
.summary { font-family: ui-monospace, monospace; font-size: 0.9em; }
.legend { font-size: 0.85em; color: #555; }
.swatch { padding: 0 0.4em; border-radius: 3px; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; word-wrap: break-word; line-height: 1.6;
        border: 1px solid #ddd; border-radius: 4px; padding: 1em; }
.tok { border-radius: 2px; cursor: help; }
.tok:hover { outline: 1px solid #333; }
.hard { text-decoration: underline; text-decoration-thickness: 2px; }
.hard-table { font-family: ui-monospace, monospace; font-size: 0.85em; border-collapse: collapse; margin-top: 1em; }
.hard-table td, .hard-table th { border: 1px solid #ddd; padding: 0.15em 0.6em; text-align: right; white-space: pre; }
"""


@dataclass(frozen=True)
class TokenSummary:
    mean_gain: float
    """Mean of thought_logprob - base_logprob over the scored tokens (nats/token)."""
    helped_share: float
    """Share of the scored tokens whose log-prob thinking raised."""
    scored: int
    top: list[tuple[str, float]]
    """The (token, gain) of the most helped tokens, best first; only tokens that thinking helped."""


def gains(base_logprob: Sequence[float], thought_logprob: Sequence[float]) -> np.ndarray:
    """thought_logprob - base_logprob per token (NaN where a token has no score)."""
    if len(base_logprob) != len(thought_logprob):
        raise ValueError(f"{len(base_logprob)} base log-probs but {len(thought_logprob)} thoughtful ones")
    return np.asarray(thought_logprob, dtype=np.float64) - np.asarray(base_logprob, dtype=np.float64)


def summarize_tokens(
    tokens: Sequence[str], base_logprob: Sequence[float], thought_logprob: Sequence[float], top: int = TOP
) -> TokenSummary:
    gain = gains(base_logprob, thought_logprob)
    if len(tokens) != len(gain):
        raise ValueError(f"{len(tokens)} tokens but {len(gain)} log-probs: one per token")
    scored = np.isfinite(gain)
    if not scored.any():
        return TokenSummary(0.0, 0.0, 0, [])
    order = sorted((i for i in np.flatnonzero(scored) if gain[i] > 0), key=lambda i: (-gain[i], i))[:top]
    return TokenSummary(
        float(gain[scored].mean()),
        float((gain[scored] > 0).mean()),
        int(scored.sum()),
        [(tokens[int(i)], float(gain[i])) for i in order],
    )


def summary_line(tokens: Sequence[str], base_logprob: Sequence[float], thought_logprob: Sequence[float]) -> str:
    """One line for the terminal: mean gain, share of tokens helped, the most helped tokens."""
    s = summarize_tokens(tokens, base_logprob, thought_logprob)
    best = ", ".join(f"{token!r} {gain:+.3f}" for token, gain in s.top) or "none"
    return (
        f"thinking changed log-prob by {s.mean_gain:+.3f} nats/token on average over {s.scored} tokens; "
        f"{100 * s.helped_share:.1f}% helped; most helped: {best}"
    )


def hard_line(base_logprob: Sequence[float], thought_logprob: Sequence[float], hard: Sequence[bool]) -> str | None:
    """The NLL without and with thoughts on the hard tokens (e.g. the answers of the synthetic corpus) and on the
    others; None when no scored token is hard."""
    gain = gains(base_logprob, thought_logprob)
    flags = np.asarray(hard, dtype=bool)
    if len(flags) != len(gain):
        raise ValueError(f"{len(flags)} hard-token flags but {len(gain)} log-probs: one per token")
    scored = np.isfinite(gain)
    base, thought = -np.asarray(base_logprob, np.float64), -np.asarray(thought_logprob, np.float64)
    parts = []
    for name, chosen in (("hard tokens", scored & flags), ("other tokens", scored & ~flags)):
        if chosen.any():
            parts.append(
                f"{int(chosen.sum())} {name}: NLL {base[chosen].mean():.3f} without thoughts, "
                f"{thought[chosen].mean():.3f} with ({-gain[chosen].mean():+.3f})"
            )
    return "; ".join(parts) if (scored & flags).any() else None


def render_html(
    tokens: Sequence[str],
    base_logprob: Sequence[float],
    thought_logprob: Sequence[float],
    thoughts: Sequence[str],
    title: str,
    hard: Sequence[bool] | None = None,
) -> str:
    """A self-contained page: each token shaded green (thinking helped) or red (hurt), its thought on hover; hard
    tokens (when `hard` marks them) underlined, with their NLL beside the others' in the header."""
    gain = gains(base_logprob, thought_logprob)
    if not len(tokens) == len(gain) == len(thoughts):
        raise ValueError(f"{len(tokens)} tokens, {len(gain)} log-probs and {len(thoughts)} thoughts: one per token")
    hard = [False] * len(tokens) if hard is None else list(hard)
    hard_summary = hard_line(base_logprob, thought_logprob, hard)
    finite = np.abs(gain[np.isfinite(gain)])
    scale = float(np.quantile(finite, SATURATION_QUANTILE)) if finite.size else 0.0
    spans = []
    rows = zip(tokens, gain, base_logprob, thought_logprob, thoughts, hard, strict=True)
    for token, g, base, thought_lp, thought, is_hard in rows:
        if np.isfinite(g):
            tip = f"{g:+.3f} nats (base {base:.3f}, with thought {thought_lp:.3f})\nthought: {thought}"
            style = f' style="background:{_colour(g, scale)}"'
        else:
            tip, style = f"not scored\nthought: {thought}", ""
        kind = "tok hard" if is_hard else "tok"
        spans.append(f'<span class="{kind}"{style} title="{html.escape(tip)}">{html.escape(token)}</span>')
    summary = html.escape(summary_line(tokens, base_logprob, thought_logprob))
    if hard_summary is not None:
        summary += f"<br>{html.escape(hard_summary)} (hard tokens underlined)"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="summary">{summary}</p>\n'
        f'<p class="legend"><span class="swatch" style="background:{_colour(1.0, 1.0)}">thinking helped</span> '
        f'<span class="swatch" style="background:{_colour(-1.0, 1.0)}">thinking hurt</span> '
        "(log-prob with the thought minus without; hover a token for its thought)</p>\n</header>\n"
        f'<main class="text">{"".join(spans)}</main>\n'
        f"{_hard_table(tokens, base_logprob, thought_logprob, thoughts, hard)}"
        "</body>\n</html>\n"
    )


def _hard_table(
    tokens: Sequence[str],
    base_logprob: Sequence[float],
    thought_logprob: Sequence[float],
    thoughts: Sequence[str],
    hard: Sequence[bool],
) -> str:
    """The scored hard tokens, each with the thought sampled before it and its NLL without and with it ("" if none)."""
    rows = [
        f"<tr><td>{i}</td><td>{html.escape(tokens[i])}</td><td>{html.escape(thoughts[i])}</td>"
        f"<td>{-base_logprob[i]:.3f}</td><td>{-thought_logprob[i]:.3f}</td></tr>"
        for i in range(len(tokens))
        if hard[i] and np.isfinite(base_logprob[i]) and np.isfinite(thought_logprob[i])
    ]
    if not rows:
        return ""
    head = "<tr><th>token #</th><th>hard token</th><th>thought before it</th><th>NLL without</th><th>with</th></tr>"
    return f'<table class="hard-table">\n{head}\n' + "\n".join(rows) + "\n</table>\n"


def _colour(gain: float, scale: float) -> str:
    """Green for a gain, red for a loss, opacity growing with |gain| / scale up to full at `scale`."""
    alpha = 0.0 if scale <= 0 else min(abs(gain) / scale, 1.0) * 0.85
    rgb = "22, 163, 74" if gain > 0 else "220, 38, 38"
    return f"rgba({rgb}, {alpha:.3f})"
