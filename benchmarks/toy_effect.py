"""Does thinking help the hard tokens of the toy corpus? The held-out measurement of qstar/core/toy_effect.py (what
`qstar train` prints at its end on synthetic data), on any checkpoint, with every metric and per chain length.

    python benchmarks/toy_effect.py runs/qstar/model [--json out.json]   # after `qstar train`
    python benchmarks/toy_effect.py weights/arith-llama --recipe toy     # before training (the mixing weight is 0)

The held-out set and the metrics: qstar/core/toy_effect.py.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import qstar
from qstar.core import toy_effect


def measure(
    path: str, backend: str = "torch", count: int = 512, seed: int = 0, recipe: str | None = None, **overrides: Any
) -> dict:
    m = qstar.load(path, backend=backend, recipe=recipe, **overrides)
    return {"model": path, "backend": backend, **toy_effect.measure(m, count, seed)}


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
