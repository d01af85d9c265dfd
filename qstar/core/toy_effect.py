"""Does thinking help the hard tokens of the toy corpus? The held-out measurement behind the README's table, which
`qstar train` on `--data synthetic` prints at its end and benchmarks/toy_effect.py runs on any checkpoint.

Held-out set (fixed, never tuned): the first `count` documents of
`synthetic.generate_documents(count, seed=EVAL_SEED, difficulty=(1, 4), split="validation")`, hidden form, whose
problems no training stage sees (qstar/core/synthetic.py: splits by a hash of the problem). Each document is one row,
`<s>` + text + `</s>`, rows of one length batched together (no padding).

Metrics, all from one thought per position sampled with numpy seed `seed` at the recipe's temperature
(`QStarModel.next_token_logits`, the inference path: the plain next-token logits and the ones mixed after a thought):
- answer NLL without / with thought: -log p(answer digit) at the position before it (the `=`);
- all-token NLL without / with: the mean over every target of every row (first character to `</s>`);
- mixing weight: mean over every position of the mixing-head weight of the first lookahead token (`QStarModel.loss`,
  same numpy seed), and its mean at the answer positions;
- thoughts with the intermediates: share of the thoughts sampled at the answer positions of chains of >= 2 functions
  whose text starts with the intermediate values (`synthetic.intermediates`, e.g. `95` for `6:dhb=0.`); also the
  share whose text starts with every value including the answer (`950`), and the share that contains the answer
  digit anywhere;
each also per chain length.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from qstar.core import synthetic
from qstar.core.model import QStarModel

EVAL_SEED = 20240
"""The held-out documents' seed (fixed before any recipe was tuned)."""
COUNT = 512


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def document_scores(m: QStarModel, group: list[str], seed: int) -> list[dict[str, Any]]:
    """The measurements of documents of one length, scored together."""
    tok = m.tokenizer
    ids = np.array([tok(d)["input_ids"] + [tok.eos_token_id] for d in group], np.int64)
    out = m.next_token_logits(ids, seed=seed)
    plain, mixed, thoughts = out.plain, out.mixed, out.thoughts
    weights = m.loss(ids, seed=seed).mixing_weight[0]  # (B*P, S): j = 1, every stream
    targets = ids[:, 1:]
    lp_plain = np.take_along_axis(log_softmax(plain[:, :-1]), targets[..., None], -1)[..., 0]
    lp_mixed = np.take_along_axis(log_softmax(mixed[:, :-1]), targets[..., None], -1)[..., 0]
    answer = 1 + synthetic.answer_index(group[0])  # token index of the answer (after <s>)
    P = weights.shape[0] // len(group)
    scores = []
    for b, d in enumerate(group):
        start, chain, _ = synthetic.parse(d)
        thought, want = tok.decode(thoughts[b, answer - 1].tolist()), synthetic.intermediates(d)
        trace = synthetic.values(start, chain)
        scores.append(
            dict(
                chain=len(chain),
                answer_base=-lp_plain[b, answer - 1],
                answer_thought=-lp_mixed[b, answer - 1],
                all_base=-lp_plain[b].mean(),
                all_thought=-lp_mixed[b].mean(),
                targets=targets.shape[1],
                weight=weights[b * P : (b + 1) * P].mean(),
                weight_answer=weights[b * P : (b + 1) * P, answer - 1].mean(),
                correct=float(thought.startswith(want)) if want else np.nan,
                has_answer=float(str(trace[-1]) in thought),
                trace=float(thought.startswith("".join(map(str, trace)))),
                thought=thought,
            )
        )
    return scores


def summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    n_targets = sum(i["targets"] for i in items)

    def token_mean(key: str) -> float:
        return float(sum(i[key] * i["targets"] for i in items) / n_targets)

    correct = [i["correct"] for i in items if not np.isnan(i["correct"])]
    return dict(
        documents=len(items),
        answer_nll_base=float(np.mean([i["answer_base"] for i in items])),
        answer_nll_thought=float(np.mean([i["answer_thought"] for i in items])),
        all_nll_base=token_mean("all_base"),
        all_nll_thought=token_mean("all_thought"),
        mixing_weight=token_mean("weight"),
        mixing_weight_answer=float(np.mean([i["weight_answer"] for i in items])),
        thoughts_correct=float(np.mean(correct)) if correct else None,
        thoughts_with_answer=float(np.mean([i["has_answer"] for i in items])),
        thoughts_full_trace=float(np.mean([i["trace"] for i in items])),
    )


def measure(m: QStarModel, count: int = COUNT, seed: int = 0) -> dict[str, Any]:
    """The held-out measurement of a loaded model: every metric over all documents and per chain length."""
    docs = synthetic.generate_documents(count, seed=EVAL_SEED, difficulty=(1, 4), split="validation")
    groups: dict[int, list[str]] = defaultdict(list)
    for d in docs:
        groups[len(d)].append(d)
    tic = time.perf_counter()
    scores = [s for n, (_, group) in enumerate(sorted(groups.items())) for s in document_scores(m, group, seed + n)]
    by_chain: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in scores:
        by_chain[s["chain"]].append(s)
    return {
        "seconds": time.perf_counter() - tic,
        "all": summary(scores),
        "by_chain": {c: summary(by_chain[c]) for c in sorted(by_chain)},
        "sample_thoughts": {c: [i["thought"] for i in by_chain[c][:6]] for c in sorted(by_chain)},
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line in the README table's terms."""
    s = result["all"]
    correct = (
        "" if s["thoughts_correct"] is None else f"; {s['thoughts_correct']:.1%} of the thoughts with the intermediates"
    )
    return (
        f"held-out ({s['documents']} documents, as in the README's table): answer NLL {s['answer_nll_base']:.3f} -> "
        f"{s['answer_nll_thought']:.3f} (gain {s['answer_nll_base'] - s['answer_nll_thought']:.3f}), all-token NLL "
        f"{s['all_nll_base']:.3f} -> {s['all_nll_thought']:.3f} (gain {s['all_nll_base'] - s['all_nll_thought']:.3f}), "
        f"mixing weight {s['mixing_weight']:.2f}{correct}"
    )
