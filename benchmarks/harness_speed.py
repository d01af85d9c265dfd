"""lm-evaluation-harness loglikelihood requests through QStarLM, with and without thoughts: requests per second and
peak memory, each configuration in a fresh process of its own (so that peaks do not mix), the current code and the
code before (`--before REV`: that commit's qstar/core/eval/harness.py, read with `git show` and run on the current
core, whose next_token_logits it calls as it did) side by side in one run.

Workloads: `gsm8k`, the GSM8K test questions as contexts, each with four numeric answers as continuations (a
multiple-choice task's shape), through QStarLM.loglikelihood as the harness calls it; `context512`, 8 requests of
512-token contexts (GSM8K questions and answers, cut at 512 tokens) each continued by the next question's answer.

    python benchmarks/harness_speed.py MODEL [--workload gsm8k] [--workload context512] [--code before] [--code after]
        [--requests 32] [--batch-size 8] [--backend torch] [--threads N] [--before REV] [--publish NAME]

Memory: the process's peak resident set (VmHWM; the model's load included) and the peak while scoring (VmHWM reset
after the load), with the resident set when scoring starts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance

from qstar.core.ops import peak_rss_gb, reset_peak_rss, rss_gb

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "b102fea"
"""The last commit before the harness model scored at the scored positions only, on the device."""
CONTEXT = 512


DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
"""GSM8K's test set (--data)."""


def documents(data: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in data.read_text().splitlines()]


def answer(row: dict[str, str]) -> int:
    return int(row["answer"].split("####")[-1].replace(",", ""))


def gsm8k_requests(data: Path, n: int) -> list[Instance]:
    """n (context, continuation) pairs: a question with its answer and three wrong ones, four to a question."""
    out: list[Instance] = []
    for i, row in enumerate(documents(data)):
        context = f"Q: {row['question']}\nA: The answer is"
        for c in (answer(row), answer(row) + 1, answer(row) * 2, answer(row) - 3):
            out.append(Instance("loglikelihood", {}, (context, f" {c}"), i))
    return out[:n]


def context_requests(lm: Any, data: Path, n: int = 8) -> list[tuple[None, list[int], list[int]]]:
    """n requests as token ids (what loglikelihood hands _loglikelihood_tokens): the first CONTEXT tokens of the GSM8K
    questions and answers from the i-th on, continued by " The answer is N." (the i-th answer)."""
    rows, out = documents(data), []
    for i in range(n):
        text, j = "", i
        while len(lm.tok_encode(text)) < CONTEXT:
            text += f"Q: {rows[j]['question']}\nA: {rows[j]['answer']}\n\n"
            j += 1
        continuation = lm.tok_encode(f" The answer is {answer(rows[i])}.", add_special_tokens=False)
        out.append((None, lm.tok_encode(text)[:CONTEXT], continuation))
    return out


def harness_class(code: str, before: str) -> Any:
    """QStarLM as the current code writes it, or as commit `before` did."""
    if code == "after":
        from qstar.core.eval.harness import QStarLM

        return QStarLM
    path = f"{before}:qstar/core/eval/harness.py"
    source = subprocess.run(["git", "show", path], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("harness_before")
    exec(compile(source, path, "exec"), module.__dict__)
    return module.QStarLM


def measure(args: argparse.Namespace, code: str, thoughts: bool, workload: str) -> dict[str, Any]:
    """One configuration, in this process: requests/s and memory."""
    cls = harness_class(code, args.before)
    lm = cls(args.model, backend=args.backend, thoughts=thoughts, batch_size=args.batch_size, threads=args.threads)
    loaded_peak = peak_rss_gb()
    lm.loglikelihood(gsm8k_requests(args.data, 1))  # warm-up: one short request
    if workload == "gsm8k":
        work: list[Any] = gsm8k_requests(args.data, args.requests)
        run = lm.loglikelihood
    else:
        work, run = context_requests(lm, args.data), lm._loglikelihood_tokens
    reset_peak_rss()
    start_rss, start = rss_gb(), time.perf_counter()
    run(work)
    seconds = time.perf_counter() - start
    scoring_peak = peak_rss_gb()
    return {
        "code": code,
        "thoughts": thoughts,
        "workload": workload,
        "requests": len(work),
        "seconds": seconds,
        "requests_per_s": len(work) / seconds,
        "process_peak_gb": max(loaded_peak, scoring_peak),
        "scoring_peak_gb": scoring_peak,
        "scoring_start_gb": start_rss,
    }


def report(results: list[dict[str, Any]]) -> None:
    """The table, then with/without-thoughts ratios per code and workload."""
    print("| workload | code | thoughts | requests/s | process peak | scoring peak (from) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['workload']} ({r['requests']}) | {r['code']} | {str(r['thoughts']).lower()} | "
            f"{r['requests_per_s']:.3f} | {r['process_peak_gb']:.2f} GB | {r['scoring_peak_gb']:.2f} GB "
            f"({r['scoring_start_gb']:.2f}) |"
        )
    for key in sorted({(r["workload"], r["code"]) for r in results}):
        pair = {r["thoughts"]: r for r in results if (r["workload"], r["code"]) == key}
        if len(pair) == 2:
            speed = pair[True]["requests_per_s"] / pair[False]["requests_per_s"]
            memory = pair[True]["process_peak_gb"] / pair[False]["process_peak_gb"]
            scoring = pair[True]["scoring_peak_gb"] / pair[False]["scoring_peak_gb"]
            print(
                f"{key[0]}, {key[1]}: with/without thoughts: speed {speed:.2f}, process peak {memory:.2f}, "
                f"scoring peak {scoring:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--workload", action="append", choices=["gsm8k", "context512"])
    parser.add_argument("--code", action="append", choices=["before", "after"])
    parser.add_argument("--requests", type=int, default=32, help="gsm8k requests")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--before", default=BEFORE, help="the commit whose harness is the 'before'")
    parser.add_argument("--data", type=Path, default=DATA, help="GSM8K's test.jsonl")
    parser.add_argument(
        "--publish", metavar="NAME", help="record benchmarks/results/NAME.json and write its docs table"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        code, thoughts, workload = args.child.split(":")
        print(json.dumps(measure(args, code, thoughts == "true", workload)))
        return
    print(f"{args.model}: batch {args.batch_size}, backend {args.backend}, threads {args.threads}", flush=True)
    results = []
    for workload in args.workload or ["gsm8k", "context512"]:
        for code in args.code or ["before", "after"]:
            for thoughts in ("false", "true"):
                command = [sys.executable, *sys.argv, "--child", f"{code}:{thoughts}:{workload}"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    report(results)
    if args.publish:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from tables import publish, record

        before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True)
        meta = {"model": Path(args.model).name, "backend": args.backend, "threads": args.threads}
        meta |= {"batch_size": args.batch_size, "before": before.stdout.strip()}
        record(args.publish, results, "python benchmarks/harness_speed.py " + shlex.join(sys.argv[1:]), **meta)
        publish(args.publish)


if __name__ == "__main__":
    main()
