"""lm-evaluation-harness loglikelihood requests per second, with and without thoughts, measured side by side in one
process: the GSM8K test questions as contexts, each with four numeric answers as continuations (a multiple-choice
task's shape), through QStarLM.loglikelihood exactly as the harness calls it.

    python benchmarks/harness_speed.py MODEL [--requests 64] [--batch-size 8] [--backend torch] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lm_eval.api.instance import Instance

from qstar.core.eval.harness import QStarLM

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def requests(n: int) -> list[Instance]:
    """n (context, continuation) pairs: a question with its answer and three wrong ones, four to a question."""
    out: list[Instance] = []
    for i, line in enumerate(GSM8K.read_text().splitlines()):
        row = json.loads(line)
        answer = int(row["answer"].split("####")[-1].replace(",", ""))
        context = f"Q: {row['question']}\nA: The answer is"
        for c in (answer, answer + 1, answer * 2, answer - 3):
            out.append(Instance("loglikelihood", {}, (context, f" {c}"), i))
        if len(out) >= n:
            return out[:n]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    work = requests(args.requests)
    print(f"{args.model}: {len(work)} loglikelihood requests, batch {args.batch_size}, backend {args.backend}")
    for thoughts in (False, True):
        lm = QStarLM(
            args.model, backend=args.backend, thoughts=thoughts, batch_size=args.batch_size, threads=args.threads
        )
        lm.loglikelihood(work[: args.batch_size])  # warm-up
        start = time.perf_counter()
        lm.loglikelihood(work)
        seconds = time.perf_counter() - start
        print(f"thoughts={str(thoughts).lower():5}  {len(work) / seconds:7.2f} requests/s  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
