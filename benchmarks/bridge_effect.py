"""Do a real model's thoughts help through their content? The held-out measurement of the bridge world
(qstar/core/bridge.py, docs/REAL.md), fixed before any Quiet-STaR run.

    python benchmarks/bridge_effect.py CHECKPOINT [--twin TWIN] [--json out.json] [--threads N]
    python benchmarks/bridge_effect.py CHECKPOINT --premise [--shots 3] [--json out.json]
    python benchmarks/bridge_effect.py CHECKPOINT --control perturbed_last [--json out.json]

Held-out set: the first --count distinct problems of the bridge world's validation split (no training stage sees
them), drawn with seed HELD_OUT_SEED, in the hidden form. Measured on the inference path (qstar/core/heldout.py), one
thought a position, document n drawing with seed n:
- the answer word's NLL without and with the thought (the hard token), and every token's;
- the answer's NLL with each content control in place of the thoughts (random tokens; the next problem's thought at
  its answer; the thought with its first number changed): the same computation, other content;
- the share of the thoughts sampled right before the answer that hold the problem's intermediate values, in order;
- greedy accuracy on the hidden form (`qstar generate`'s path: a thought before the answer) with and without
  thoughts; --twin: the no-thought twin's answer NLL and accuracy beside them.
--premise measures what the world rests on, with no thoughts at all: the answer's NLL when the worked field is
given (teacher-forced) against the hidden form, the share of problems whose field the model writes right itself,
and its hidden-form accuracy; --shots N puts N solved problems of the same form before each (an untrained model
knows neither form).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import qstar
from qstar.core import backend as backends
from qstar.core import bridge, heldout

HELD_OUT_SEED = 2409
"""The draw of the held-out problems (fixed before any Quiet-STaR run)."""
CONTROLS = ("random", "shuffled", "perturbed")
"""The content controls fixed before any run; `--control NAME` measures others alone (heldout.CONTROLS)."""


def held_out(count: int) -> list[str]:
    """The first `count` distinct problems of the validation split, hidden form."""
    seen: dict[str, None] = {}
    for document in bridge.documents(HELD_OUT_SEED, "validation"):
        seen.setdefault(document)
        if len(seen) == count:
            return list(seen)
    raise AssertionError("unreachable: the stream is endless")


def prompt(document: str) -> str:
    """A hidden document cut right before its answer (` The result is`)."""
    return document[: document.index(bridge.ANSWER_INTRO) + len(bridge.ANSWER_INTRO)]


def holds_values(thought: str, values: list[str]) -> bool:
    """Whether a decoded thought names the intermediate values, in order, as words."""
    words = re.findall(r"[a-z]+", thought.lower())
    position = 0
    for value in values:
        if value not in words[position:]:
            return False
        position = words.index(value, position) + 1
    return True


def answers(model: qstar.QStarModel, documents: list[str], thoughts: bool) -> float:
    """Greedy accuracy: the first word generated after the prompt is the answer."""
    done = model.generate(
        [prompt(d) for d in documents], max_tokens=1, thoughts=thoughts, seed=list(range(len(documents)))
    )
    return float(np.mean([c.text.strip() == bridge.answer(d) for c, d in zip(done, documents, strict=True)]))


def effect(model: qstar.QStarModel, documents: list[str]) -> dict[str, Any]:
    scores = heldout.score(model, documents)
    view = heldout.summary(scores)
    before = [s.thoughts[np.flatnonzero(s.hard)[0]] for s in scores]  # the thought at the answer's position
    held = [
        holds_values(model.decode(list(t)), bridge.intermediates(d)) for t, d in zip(before, documents, strict=True)
    ]
    out = {
        "answer": view["hard"],
        "all": view["all"],
        "mixing_weight": view["mixing_weight"],
        "thoughts_with_intermediates": float(np.mean(held)),
        "thoughts_before_answers": [model.decode(list(t)) for t in before[:8]],
        "accuracy_with_thoughts": answers(model, documents, True),
        "accuracy_without_thoughts": answers(model, documents, False),
    }
    return out | controls(model, documents, CONTROLS)


def controls(model: qstar.QStarModel, documents: list[str], names: tuple[str, ...]) -> dict[str, Any]:
    """The answer's NLL with each content control in place of the model's thoughts."""
    out = {}
    for control in names:
        view = heldout.summary(heldout.score(model, documents, control=control, hard_only=True))
        out[f"control_{control}"] = {"answer": view["hard"]}
    return out


def nll_of_answer(model: qstar.QStarModel, context: str, answer: str) -> float:
    ids = model.tokenizer(context + " " + answer)["input_ids"]
    logits = np.asarray(model.logits(np.array([ids]))[0, -2], np.float64)
    return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ids[-1]])


def premise(model: qstar.QStarModel, documents: list[str], shots: int) -> dict[str, Any]:
    """The world's premise, thoughts off: the answer NLL hidden against after a given (right) worked field, the
    share of fields the model writes right itself (greedy), its hidden-form accuracy."""
    examples = bridge.generate_documents(shots, seed=1, split="pretrain")
    hidden_examples = [bridge.render(*bridge.parse(e)[:2], False) for e in examples]
    worked_examples = [bridge.render(*bridge.parse(e)[:2], True) for e in examples]
    rows = []
    for document in documents:
        start, steps, _ = bridge.parse(document)
        worked = bridge.render(start, steps, True)
        field = worked[: worked.rindex(" ")]  # up to the closing dash
        hidden_context = "\n".join([*hidden_examples, prompt(document)])
        worked_context = "\n".join([*worked_examples, field])
        written = model.generate(["\n".join([*worked_examples, prompt(document)])], max_tokens=8, thoughts=False)[0]
        rows.append(
            (
                nll_of_answer(model, hidden_context, bridge.answer(document)),
                nll_of_answer(model, worked_context, bridge.answer(document)),
                written.text.startswith(field[len(prompt(document)) :]),
                model.generate([hidden_context], max_tokens=1, thoughts=False)[0].text.strip()
                == bridge.answer(document),
            )
        )
    means = np.array(rows, np.float64).mean(axis=0)
    names = ("answer_nll_hidden", "answer_nll_worked_field_given", "fields_written_right", "hidden_accuracy")
    return {"shots": shots, **dict(zip(names, map(float, means), strict=True))}


def loaded(checkpoint: str, backend: str, threads: int | None) -> qstar.QStarModel:
    """The checkpoint on `backend`, with the CPU threads asked for (else the backend's choice for its size)."""
    model = qstar.load(checkpoint, backend=backend)
    backends.get(backend).set_threads(threads, model.parameter_count)
    return model


def measure(checkpoint: str, twin: str | None, count: int, threads: int | None, backend: str) -> dict[str, Any]:
    tic = time.perf_counter()
    documents = held_out(count)
    model = loaded(checkpoint, backend, threads)
    out: dict[str, Any] = {"checkpoint": checkpoint, "count": count, "backend": backend, **effect(model, documents)}
    if twin is not None:
        other = qstar.load(twin, backend=backend)
        view = heldout.summary(heldout.score(other, documents, hard_only=True))
        out["twin"] = {"checkpoint": twin, "answer": view["hard"]}
        out["twin"]["accuracy"] = answers(other, documents, False)
    out["seconds"] = time.perf_counter() - tic
    return out


def show(r: dict[str, Any]) -> str:
    a = r["answer"]
    lines = [
        f"{r['checkpoint']} ({r['count']} held-out problems, {r['seconds']:.0f} s)",
        f"  answer NLL {a['nll_base']:.3f} -> {a['nll_talk']:.3f} with thoughts (gain {a['gain']:+.3f}); all tokens "
        f"{r['all']['nll_base']:.3f} -> {r['all']['nll_talk']:.3f}; mixing weight {r['mixing_weight']:.3f}",
        *(
            f"  control {c:>9}: answer NLL with thoughts {r[f'control_{c}']['answer']['nll_talk']:.3f} (gain "
            f"{r[f'control_{c}']['answer']['gain']:+.3f})"
            for c in CONTROLS
        ),
        f"  thoughts before the answer holding the intermediate values: {r['thoughts_with_intermediates']:.1%}",
        f"  greedy accuracy: {r['accuracy_with_thoughts']:.1%} with thoughts, {r['accuracy_without_thoughts']:.1%} "
        "without",
    ]
    if "twin" in r:
        t = r["twin"]
        lines.append(f"  no-thought twin: answer NLL {t['answer']['nll_base']:.3f}, accuracy {t['accuracy']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--twin", help="the no-thought twin of the run (qstar train --no-thoughts)")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--premise", action="store_true", help="measure the premise instead (no thoughts)")
    parser.add_argument("--shots", type=int, default=0, help="--premise: solved problems before each")
    parser.add_argument("--backend", default="torch")
    parser.add_argument(
        "--control", action="append", choices=heldout.CONTROLS[1:], help="measure only these content controls"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: the backend's choice for the model)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.premise:
        m = loaded(args.checkpoint, args.backend, args.threads)
        result = {"checkpoint": args.checkpoint, "count": args.count, **premise(m, held_out(args.count), args.shots)}
        print(json.dumps(result, indent=2))
    elif args.control:
        m = loaded(args.checkpoint, args.backend, args.threads)
        result = {"checkpoint": args.checkpoint, "count": args.count, "backend": args.backend}
        result |= controls(m, held_out(args.count), tuple(args.control))
        print(json.dumps(result, indent=2))
    else:
        result = measure(args.checkpoint, args.twin, args.count, args.threads, args.backend)
        print(show(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0)
