"""Does thinking help a real pretrained model? The held-out measurement of the real-model study (docs/REAL.md), fixed
before any recipe was tried.

    python benchmarks/real_effect.py CHECKPOINT --reference BASE --json out.json \
        [--control random] [--threads N] [--clean] [--skip N]

Held-out set: GSM8K's test split (`../shared/data/gsm8k/test.jsonl`), the problems a numpy permutation with seed
HELD_OUT_SEED puts first, the first --count of them, each `question\\nanswer` (the worked solution, ending in
`#### N`) keeping its last --max-tokens tokens. Metrics (qstar/core/heldout.py), thoughts drawn with numpy seed
--seed: the next-token NLL without and with the thought over every token, over the answer (the tokens of N after
`####`, the paper's teacher-forced metric) and over the hardest 10% of tokens as the untrained model (--reference)
ranks them; over every token but the markers of GSM8K's calculator annotations (`plain`: added after the first
trained run, which showed most of its gain on them); the mean mixing weight. --control random replaces every thought
by random tokens (the same computation, no content). --clean removes the annotations from the text (for a model
trained on text without them: `write_clean`). --skip N scores problems N+1..count alone, each with the thoughts it
draws in the whole set, so a slow backend can score a set in parts (the hardest tokens are then a part's own). A
recipe is chosen on the validation split of GSM8K's train split, never on this set.
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
from qstar.core import heldout

HELD_OUT_SEED = 2403
"""The permutation of the test problems (fixed before any run)."""
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
ANNOTATION = re.compile(r"<<[^<>]*>>")
"""GSM8K's calculator annotations, `<<48/2=24>>`, which the solution text repeats right after (`= <<48/2=24>>24`)."""


def read(path: Path, clean: bool = False) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if clean:
        records = [{**r, "answer": ANNOTATION.sub("", r["answer"])} for r in records]
    return records


def write_clean(src: Path, dst: Path) -> None:
    """A copy of a GSM8K split with the annotations removed (training text for a `--clean` measurement)."""
    dst.write_text("".join(json.dumps(r) + "\n" for r in read(src, clean=True)))


def documents(path: Path, count: int, clean: bool = False) -> list[str]:
    records = read(path, clean)
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(records))[:count]
    return [f"{records[i]['question']}\n{records[i]['answer']}" for i in order]


def annotation_markers(model: qstar.QStarModel, ids: list[int]) -> np.ndarray:
    """(n - 1,) bool: the predicted token opens or closes one of GSM8K's calculator annotations (`<<48/2=24>>`),
    a format the untrained model finds very unlikely and a thought learns to announce (the `plain` view leaves them
    out)."""
    pieces = model.tokenizer.batch_decode([[i] for i in ids[1:]])
    lengths = np.array([len(p) for p in pieces])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    marked = np.zeros(len(pieces), bool)
    for found in re.finditer("<<|>>", "".join(pieces)):  # a marker may span two tokens
        marked |= (starts < found.end()) & (ends > found.start())
    return marked


def measure(
    checkpoint: str,
    reference: str | None,
    data: Path = SHARED,
    count: int = 64,
    max_tokens: int = 192,
    seed: int = 0,
    control: str = "none",
    backend: str = "torch",
    threads: int | None = None,
    clean: bool = False,
    skip: int = 0,
) -> dict[str, Any]:
    docs = documents(data, count, clean)[skip:]
    tic = time.perf_counter()
    trained = qstar.load(checkpoint, backend=backend)
    backends.get(backend).set_threads(threads, trained.parameter_count)
    scores = heldout.score(trained, docs, seed + skip, control, max_tokens)  # problem n draws with seed + n
    model = None if reference is None else qstar.load(reference, backend=backend)
    ranked = None if model is None else heldout.plain_nll(model, docs, max_tokens)
    more = {"plain": [~annotation_markers(trained, s.ids) for s in scores]}
    return {
        "checkpoint": checkpoint,
        "reference": reference,
        "control": control,
        "backend": backend,
        "count": count,
        "max_tokens": max_tokens,
        "seed": seed,
        "clean": clean,
        "skip": skip,
        "seconds": time.perf_counter() - tic,
        **heldout.summary(scores, ranked, more=more),
    }


def show(r: dict[str, Any]) -> str:
    problems = f"problems {r['skip'] + 1}-{r['count']}" if r.get("skip") else f"{r['count']} problems"
    lines = [f"{r['checkpoint']} ({r['backend']}, control {r['control']}, {problems}, {r['seconds']:.0f} s)"]
    for view in ("all", "hard", "hardest", "plain"):
        if view in r:
            v = r[view]
            nll = f"NLL {v['nll_base']:.4f} -> {v['nll_talk']:.4f}, gain {v['gain']:+.4f}"
            lines.append(f"  {view:>7} ({v['tokens']:5d} tokens): {nll}")
    lines.append(f"  mixing weight {r['mixing_weight']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--reference", help="the untrained model, which ranks the hardest tokens")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", choices=heldout.CONTROLS, default="none")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the backend's choice for the model)")
    parser.add_argument("--clean", action="store_true", help="remove GSM8K's calculator annotations from the text")
    parser.add_argument("--skip", type=int, default=0, help="score problems skip+1..count (a part of the set)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(
        args.checkpoint,
        args.reference,
        args.data,
        args.count,
        args.max_tokens,
        args.seed,
        args.control,
        args.backend,
        args.threads,
        args.clean,
        args.skip,
    )
    print(show(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0)
