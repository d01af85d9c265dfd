"""Does thinking help the hard tokens of the toy corpus? Held-out measurement of a trained qstar checkpoint.

    python benchmarks/toy_effect.py runs/qstar/model [--json out.json]   # after `qstar train`
    python benchmarks/toy_effect.py weights/arith-llama --recipe toy     # before training (the mixing weight is 0)

Held-out set (fixed, never tuned): the first --count documents of
`synthetic.generate_documents(count, seed=EVAL_SEED, difficulty=(1, 4), split="validation")`, hidden form, whose
problems no training stage sees (qstar/core/synthetic.py: splits by a hash of the problem). Each document is one row,
`<s>` + text + `</s>`, rows of one length batched together (no padding).

Metrics, all from one thought per position sampled with numpy seed --seed at the recipe's temperature
(`QStarModel.next_token_logits`, the inference path: the plain next-token logits and the ones mixed after a thought):
- answer NLL without / with thought: -log p(answer digit) at the position before it (the `=`);
- all-token NLL without / with: the mean over every target of every row (first character to `</s>`);
- mixing weight: mean over every position of the mixing-head weight of the first lookahead token (`QStarModel.loss`,
  same numpy seed), and its mean at the answer positions;
- thoughts with the intermediates: share of the thoughts sampled at the answer positions of chains of >= 2 functions
  whose text starts with the intermediate values (`synthetic.intermediates`, e.g. `95` for `6:dhb=0.`); also
  (added after the first runs, stricter) the share whose text starts with every value including the answer
  (`950`), and the share that contains the answer digit anywhere;
each also per chain length.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import numpy as np

import qstar
from qstar.core import synthetic

EVAL_SEED = 20240
"""The held-out documents' seed (fixed before any recipe was tuned)."""


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def measure(
    path: str, backend: str = "torch", count: int = 512, seed: int = 0, recipe: str | None = None, **overrides: Any
) -> dict:
    m = qstar.load(path, backend=backend, recipe=recipe, **overrides)
    tok = m.tokenizer
    docs = synthetic.generate_documents(count, seed=EVAL_SEED, difficulty=(1, 4), split="validation")
    groups: dict[int, list[str]] = defaultdict(list)
    for d in docs:
        groups[len(d)].append(d)
    rows: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)  # per chain length: lists of per-document values
    tic = time.perf_counter()
    for n, (_, group) in enumerate(sorted(groups.items())):
        ids = np.array([tok(d)["input_ids"] + [tok.eos_token_id] for d in group], np.int64)
        assert all(tok.decode(r[1:-1]) == d for r, d in zip(ids, group, strict=True))
        plain, mixed, thoughts = m.next_token_logits(ids, seed=seed + n)
        weights = m.loss(ids, seed=seed + n).mixing_weight[0]  # (B*P, S): j = 1, every stream
        targets = ids[:, 1:]
        lp_plain = np.take_along_axis(log_softmax(plain[:, :-1]), targets[..., None], -1)[..., 0]
        lp_mixed = np.take_along_axis(log_softmax(mixed[:, :-1]), targets[..., None], -1)[..., 0]
        answer = 1 + synthetic.answer_index(group[0])  # token index of the answer (after <s>)
        assert all(h == answer - 1 for d in group for h in [synthetic.hard_mask(d).index(True)])
        P = weights.shape[0] // len(group)
        for b, d in enumerate(group):
            chain = len(synthetic.parse(d)[1])
            thought = tok.decode(thoughts[b, answer - 1].tolist())
            want = synthetic.intermediates(d)
            r = rows[chain]
            r.append(
                dict(
                    answer_base=-lp_plain[b, answer - 1],
                    answer_thought=-lp_mixed[b, answer - 1],
                    all_base=-lp_plain[b].mean(),
                    all_thought=-lp_mixed[b].mean(),
                    targets=targets.shape[1],
                    weight=weights[b * P : (b + 1) * P].mean(),
                    weight_answer=weights[b * P : (b + 1) * P, answer - 1].mean(),
                    correct=float(thought.startswith(want)) if want else np.nan,
                    has_answer=float(str(synthetic.values(*synthetic.parse(d)[:2])[-1]) in thought),
                    trace=float(thought.startswith("".join(map(str, synthetic.values(*synthetic.parse(d)[:2]))))),
                    thought=thought,
                )
            )
    seconds = time.perf_counter() - tic

    def summary(items: list[dict]) -> dict:
        n_targets = sum(i["targets"] for i in items)
        token_mean = lambda key: sum(i[key] * i["targets"] for i in items) / n_targets  # noqa: E731
        correct = [i["correct"] for i in items if not np.isnan(i["correct"])]
        return dict(
            documents=len(items),
            answer_nll_base=float(np.mean([i["answer_base"] for i in items])),
            answer_nll_thought=float(np.mean([i["answer_thought"] for i in items])),
            all_nll_base=float(token_mean("all_base")),
            all_nll_thought=float(token_mean("all_thought")),
            mixing_weight=float(token_mean("weight")),
            mixing_weight_answer=float(np.mean([i["weight_answer"] for i in items])),
            thoughts_correct=float(np.mean(correct)) if correct else None,
            thoughts_with_answer=float(np.mean([i["has_answer"] for i in items])),
            thoughts_full_trace=float(np.mean([i["trace"] for i in items])),
        )

    every = [i for c in sorted(rows) for i in rows[c]]
    result = {
        "model": path,
        "backend": backend,
        "seconds": seconds,
        "all": summary(every),
        "by_chain": {c: summary(rows[c]) for c in sorted(rows)},
        "sample_thoughts": {c: [i["thought"] for i in rows[c][:6]] for c in sorted(rows)},
    }
    return result


def show(result: dict) -> str:
    lines = [f"{result['model']} ({result['backend']}, {result['seconds']:.1f}s)"]
    head = "chain  docs  ans_base ans_thought  all_base all_thought  w_all  w_ans  correct  has_ans  trace"
    lines.append(head)
    for name, s in [("all", result["all"]), *result["by_chain"].items()]:
        correct = "  -  " if s["thoughts_correct"] is None else f"{s['thoughts_correct']:.3f}"
        lines.append(
            f"{name!s:>5} {s['documents']:5d}  {s['answer_nll_base']:8.3f} {s['answer_nll_thought']:11.3f}  "
            f"{s['all_nll_base']:8.3f} {s['all_nll_thought']:11.3f}  {s['mixing_weight']:5.2f}  "
            f"{s['mixing_weight_answer']:5.2f}  {correct:>7}  {s['thoughts_with_answer']:.3f}  "
            f"{s['thoughts_full_trace']:.3f}"
        )
    for c, ts in result["sample_thoughts"].items():
        lines.append(f"  chain {c} thoughts: {ts}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--recipe", help="recipe preset for a checkpoint without one (the shipped model: toy)")
    parser.add_argument("--recipe-overrides", default="{}", help="JSON of recipe fields")
    args = parser.parse_args()
    overrides = json.loads(args.recipe_overrides)
    result = measure(args.model, args.backend, args.count, args.seed, args.recipe, **overrides)
    print(show(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
