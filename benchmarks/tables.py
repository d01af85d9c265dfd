"""The measured tables of the README and docs/, written only by the scripts that measure them.

A script records what it measured as benchmarks/results/NAME.json (the rows, the command that produced them, the
date and the machine) and `publish(NAME)` writes the rendered markdown between the markers
`<!-- table:NAME -->` and `<!-- /table:NAME -->` of every document that has them. tests/test_docs_tables.py renders
each block again from its JSON: a table edited by hand fails CI.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def machine() -> str:
    import os

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


def commit() -> str:
    """The commit the measured code is at ("+changes" when the working tree differs from it)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "--", "qstar", "cli") else "")


def record(name: str, rows: list[dict[str, Any]], command: str, **meta: Any) -> dict[str, Any]:
    """Save a table's measurements: benchmarks/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    results = {"command": command, "date": today, "commit": commit(), "machine": machine(), **meta, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def load(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return result


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def source(results: dict[str, Any], verb: str = "Measured") -> str:
    at = f" at commit {results['commit']}" if "commit" in results else ""
    return f"{verb} {results['date']}{at} on {results['machine']} with `{results['command']}`."


def overhead(results: dict[str, Any]) -> str:
    """`thought_overhead.py`: a qstar step against an LM step over the same W tokens (the implementation's efficiency)
    and over the same text (the user's price), and the memory each adds."""

    def price(r: dict[str, Any]) -> list[str]:
        if "price" not in r:  # measured before the price was
            return ["-", "-"]
        return [f"{r['lm_text_step_s']:.3g} s", f"{r['price']:.1f}"]

    rows = [
        [
            r["label"],
            str(r["seq_len"]),
            f"{r['qstar_step_s']:.3g} s",
            f"{r['lm_step_s']:.3g} s",
            f"{r['ratio']:.2f}",
            *price(r),
            f"{r['qstar_memory_added_gb']:.2f} / {r['lm_memory_added_gb']:.2f} GB",
        ]
        for r in results["rows"]
    ]
    header = ["backend", "L", "qstar step", "LM step over W", "ratio", "LM step over the text", "price"]
    return markdown([*header, "memory added (qstar / LM)"], rows) + "\n\n" + source(results)


def generation(results: dict[str, Any]) -> str:
    """Emitted tokens per second with and without thoughts, and the target 0.7 x plain / (k+3)."""
    rows = [
        [
            r["backend"],
            str(r["batch"]),
            f"{r['plain_tokens_per_s']:.1f}",
            f"{r['thought_tokens_per_s']:.1f}",
            f"{r['target_tokens_per_s']:.1f}",
        ]
        for r in results["rows"]
    ]
    return markdown(["backend", "batch", "plain tokens/s", "with thoughts", "target"], rows) + "\n\n" + source(results)


def operators(results: dict[str, Any]) -> str:
    """`operator_count.py`: dispatched operators per step and phase, each step's total against the LM step's."""
    lm_total, rows, out = results["lm_total"], results["rows"], []
    for step in dict.fromkeys(r["step"] for r in rows):
        mine = [r for r in rows if r["step"] == step]
        total = sum(r["compute"] for r in mine)
        out += [[step, r["phase"], str(r["compute"]), str(r["view"]), ""] for r in mine]
        out.append([step, "**total**", f"**{total}**", "", f"**{total / lm_total:.2f}**"])
    header = ["step", "phase", "compute operators", "views", "x LM step"]
    table = markdown(header, out) + f"\n\n{results['shape']}. " + source(results)
    return table + ("\n\n" + compiled_operators(results["compiled"]) if "compiled" in results else "")


def compiled_operators(results: dict[str, Any]) -> str:
    """`operator_count.py --compile`: what a compiled step launches (graph calls, generated kernels, the operators
    inside and outside the graphs) against the LM step and the eager step, counted from the same profiler events."""

    def total(r: dict[str, Any]) -> int:
        return int(r.get("kernels", 0) + r.get("in graphs", 0) + r.get("eager", 0))

    lm_total, out = total(results["rows"][0]), []
    for r in results["rows"]:
        counts = [str(r.get(key, 0)) for key in ("graph calls", "kernels", "in graphs", "eager")]
        check = str(r["dispatched"]) if "dispatched" in r else "-"
        out.append([r["step"], *counts, check, f"**{total(r)}**", f"**{total(r) / lm_total:.2f}**"])
    header = ["step", "compiled-graph calls", "generated kernels", "operators the graphs call", "operators outside"]
    note = (
        f"{results['shape']}. A step's launches (forward and backward) from torch.profiler's events: inductor's "
        "generated kernels, the operators the compiled graphs call (extern kernels such as matmuls, fallbacks) and "
        "those outside the graphs, views apart; beside them the eager steps' count by the dispatch mode of the table "
        f"above, the check of the rule. Inductor generated {results['generated_kernels']} kernels while compiling. "
    )
    header += ["(dispatch mode)", "launches", "x LM step"]
    return markdown(header, out) + "\n\n" + note + source(results)


def modes(results: dict[str, Any]) -> str:
    """`step_modes.py`: one-pass and two-pass step times side by side."""
    rows = [
        [str(r["seq_len"]), f"{r['one-pass']:.3g} s", f"{r['two-pass']:.3g} s", f"{r['two-pass'] / r['one-pass']:.2f}"]
        for r in results["rows"]
    ]
    header = ["L", "one-pass step", "two-pass step", "two-pass / one-pass"]
    return markdown(header, rows) + f"\n\n{results['threads']} CPU thread(s). " + source(results)


def toy(results: dict[str, Any]) -> str:
    """`toy_table.py`: held-out NLL of the toy corpus's answers and of all tokens, without -> with thoughts (runs), or
    per chain length (the rows of one run)."""

    def value(r: dict[str, Any], key: str, digits: int = 3) -> str:
        if r.get(key) is None:
            return "-"
        sd = r.get(key + "_sd")
        return f"{r[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    def share(r: dict[str, Any]) -> str:
        if r.get("thoughts_correct") is None:
            return "-"
        sd = r.get("thoughts_correct_sd")
        return f"{100 * r['thoughts_correct']:.1f}%" + (f" ± {100 * sd:.1f}" if sd is not None else "")

    rows = results["rows"]
    if "chain" in rows[0]:
        header = ["functions", "documents", "answer NLL without", "with thoughts", "all-token NLL without", "with"]
        header.append("thoughts with the intermediates")
        body = [
            [str(r["chain"]), str(r["documents"]), value(r, "answer_nll_base"), value(r, "answer_nll_thought")]
            + [value(r, "all_nll_base"), value(r, "all_nll_thought"), share(r)]
            for r in rows
        ]
        return markdown(header, body) + "\n\n" + source(results)
    header = ["run", "answer NLL without -> with thoughts", "gain", "all-token NLL without -> with", "gain"]
    header += ["mixing weight", "thoughts with the intermediates", "train wall (1 core)"]
    body = []
    for r in rows:
        bold = "**" if r["name"] == "mean" else ""
        wall = (
            "-"
            if r.get("wall_s") is None
            else f"{r['wall_s']:.0f} s" + (f" ± {r['wall_s_sd']:.0f}" if r.get("wall_s_sd") is not None else "")
        )
        body.append(
            [
                f"{bold}{r['flags']}{bold}",
                f"{value(r, 'answer_nll_base')} -> {value(r, 'answer_nll_thought')}",
                f"{bold}{value(r, 'answer_gain')}{bold}",
                f"{value(r, 'all_nll_base')} -> {value(r, 'all_nll_thought')}",
                value(r, "all_gain"),
                value(r, "mixing_weight", 2),
                share(r),
                wall,
            ]
        )
    return markdown(header, body) + "\n\n" + source(results)


def fsdp(results: dict[str, Any]) -> str:
    """`fsdp_collectives.py`: FSDP2's collectives and time per step, resharding after each call or not."""
    rows = [
        [
            "yes (default)" if r["reshard_after_forward"] else "no",
            f"{r['all_gathers']} ({r['all_gathers'] / results['units']:.1f} per unit)",
            str(r["reduce_scatters"]),
            f"{r['step_s']:.3f} s",
        ]
        for r in results["rows"]
    ]
    header = ["reshard after forward", "all-gathers a step", "reduce-scatters a step", "step"]
    units = f"{results['units']} FSDP units (a unit per decoder layer, the root), {results['ranks']} CPU ranks (gloo). "
    return markdown(header, rows) + "\n\n" + units + source(results)


def memory(results: dict[str, Any]) -> str:
    """`memory_table.py`: estimated peak memory a device and where it fits (memory-fits), or the estimate against
    steps measured on a CPU (memory-measured)."""
    rows = results["rows"]
    if "measured_gb" in rows[0]:
        body = [
            [
                r["backend"],
                r["fine_tune_type"],
                str(r["seq_len"]),
                f"{r['measured_gb']:.3f} GB",
                f"{r['estimated_gb']:.3f} GB",
                f"{r['measured_gb'] / r['estimated_gb']:.2f}",
            ]
            for r in rows
        ]
        header = ["backend", "fine-tune", "L", "measured", "estimated", "measured / estimated"]
        shape = "Llama, hidden 256, 4 layers, k=8, A=4, P=2, batch 1, float32, --grad-checkpoint. "
        return markdown(header, body) + "\n\n" + shape + source(results)

    def cell(estimate: dict[str, Any], where: str) -> str:
        fit = [name.split(" ")[0] + " GB" for name in estimate["fits"] if where in name]
        return f"{estimate['gb']:.1f} GB: " + (f"fits {fit[0]}" if fit else "**does not fit**")

    step = results["step"]
    body = [
        [r["model"], r["fine_tune"], cell(r["one_gpu"], "GPU"), cell(r["gpus"], "GPU"), cell(r["mac"], "Mac")]
        for r in rows
    ]
    header = ["model", "fine-tune", "1 GPU", f"{step['gpus']} GPUs (each; full: FSDP2)", "64 GB Mac (MLX)"]
    shape = (
        f"Estimated by qstar/core/memory.py: bfloat16, L={step['seq_len']}, k={step['thought_tokens']}, "
        f"A={step['lookahead']}, P={step['thoughts_per_position']}, {step['batch']} sequence a device, two-pass steps "
        f"with --grad-checkpoint; LoRA rank {step['lora_rank']} on the last {step['lora_layers']} layers; QLoRA "
        f"{step['q_bits']}-bit: NF4 on the Linear layers (torch), affine on Linear and embeddings (MLX). A 24 GB GPU "
        "counts 20 GB (its CUDA context and fragmentation). `qstar bench --memory` shows the terms of any row. "
    )
    return markdown(header, body) + "\n\n" + shape + source(results, "Computed")


def sharded(results: dict[str, Any]) -> str:
    """`sharded_memory.py`: each rank's peak resident memory while stepping, saving and resuming, before and after."""
    rows = [
        [
            f"{r['code']} ({r['commit']})",
            str(r["rank"]),
            *(f"{r[p + '_gb']:.2f} GB (+{r[p + '_adds_gb']:.2f})" for p in ("step", "save")),
            f"{r['resume_gb']:.2f} GB",
            *(f"{r[p + '_gb'] / r['step_gb']:.2f}" for p in ("save", "resume")),
        ]
        for r in results["rows"]
    ]
    header = ["code", "rank", "step", "save", "resume", "save / step", "resume / step"]
    run = results["run"]
    shape = (
        f"{results['model']} (float32, full fine-tuning), {results['ranks']} CPU ranks (FSDP2, gloo) of "
        f"{run['threads']} thread, batch {run['batch_size']} a rank, L={run['max_seq_length']}, "
        f"k={run['thought_tokens']}, A={run['lookahead']}, {run['iters']} steps; each rank's VmHWM: the highest of its "
        "steps and over the save of the checkpoint (in brackets what they add to the resident set before them, after "
        "glibc's malloc_trim), and in the resumed run from its start through restoring it. "
    )
    return markdown(header, rows) + "\n\n" + shape + source(results)


def serve(results: dict[str, Any]) -> str:
    """`serve_load.py`: throughput and time to the first token per code, clients and thoughts, then the hardening
    checks per code (the resident set, a huge stop string beside a stream, the penalties, a killed worker)."""
    servers = results["servers"]
    rows = [
        [
            f"{r['code']} ({r['commit']})",
            str(r["clients"]),
            "yes" if r["thoughts"] else "no",
            str(r["requests"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['ttft_p50_s']:.2f} s",
            f"{r['ttft_p95_s']:.2f} s",
            str(r["failed"]),
        ]
        for r in results["rows"]
    ]
    header = ["code", "clients", "thoughts", "requests", "tokens/s (all clients)", "first token p50", "p95", "failed"]

    def answer(a: dict[str, Any]) -> str:
        return f"{a['status']} in {a['seconds']:.2f} s" if a["status"] is not None else a["error"]

    def penalties(a: dict[str, Any]) -> str:
        return str(a["status"]) + (f" ({a['error']})" if a["status"] != 200 else "")

    checks = []
    for code, s in servers.items():
        m, stop, dead = s["memory"], s["huge_stop"], s["dead_worker"]
        checks.append(
            [
                f"{code} ({s['commit']})",
                f"{m['after_warmup_mb']:.0f} -> {m['after_requests_mb']:.0f} MB ({100 * m['growth']:+.1f}%)",
                answer(stop),
                f"{stop['stream_max_gap_during_s']:.3f} s ({stop['stream_median_gap_s']:.3f} s)",
                penalties(s["penalties"]),
                str(dead["health_status"]),
                answer(dead["request"]),
            ]
        )
    check_header = ["code", f"server RSS: warm -> after {results['rss_requests']} requests", "20,000-char stop"]
    check_header += ["stream's longest gap meanwhile (median)", "penalties", "killed worker: /health", "new request"]
    shape = (
        f"{results['model']}, {results['backend']}, the server on {results['threads'] or 'the default'} CPU thread(s), "
        f"clients on the same machine; {results['requests']} streamed requests of {results['max_tokens']} tokens "
        "a cell (one a client at least), temperature 1, seeded. "
    )
    return (
        markdown(header, rows)
        + "\n\n"
        + markdown(check_header, checks)
        + "\n\n"
        + shape
        + f"{results['seconds'] / 60:.0f} min in all. "
        + source(results)
    )


def harness(results: dict[str, Any]) -> str:
    """`harness_speed.py`: loglikelihood requests/s and peak memory per workload, code and thoughts, then with
    thoughts over without."""
    rows = results["rows"]
    body = [
        [
            f"{r['workload']} ({r['requests']})",
            f"{r['code']} ({results['before'] if r['code'] == 'before' else results['commit']})",
            "yes" if r["thoughts"] else "no",
            f"{r['requests_per_s']:.3f}",
            f"{r['process_peak_gb']:.2f} GB",
            f"{r['scoring_peak_gb']:.2f} GB ({r['scoring_start_gb']:.2f})",
        ]
        for r in rows
    ]
    header = ["workload (requests)", "code", "thoughts", "requests/s", "process peak", "scoring peak (from)"]
    ratios = []
    for workload, code in dict.fromkeys((r["workload"], r["code"]) for r in rows):
        pair = {r["thoughts"]: r for r in rows if (r["workload"], r["code"]) == (workload, code)}
        if len(pair) == 2:
            with_, without = pair[True], pair[False]
            ratios.append(
                [
                    workload,
                    code,
                    f"{with_['requests_per_s'] / without['requests_per_s']:.2f}",
                    f"{with_['process_peak_gb'] / without['process_peak_gb']:.2f}",
                    f"{with_['scoring_peak_gb'] / without['scoring_peak_gb']:.2f}",
                ]
            )
    ratio_header = ["workload", "code", "requests/s with / without thoughts", "process peak", "scoring peak"]
    shape = (
        f"{results['model']}, {results['backend']}, {results['threads'] or 'the default'} CPU thread(s), batch "
        f"{results['batch_size']}, each row in a fresh process. "
    )
    return markdown(header, body) + "\n\n" + markdown(ratio_header, ratios) + "\n\n" + shape + source(results)


def signed(x: float | None, digits: int) -> str:
    """A gain in nats with its sign, or "-" where it was not measured."""
    return "-" if x is None else f"{x:+.{digits}f}"


def bridge(results: dict[str, Any]) -> str:
    """`bridge_table.py`: the bridge world's held-out answer NLL per seed of the pair (Quiet-STaR and its no-thought
    twin), the accuracies, the thoughts holding the intermediate values and each content control's gain, then the
    seeds' mean and range."""

    def nats(x: float | None) -> str:
        return signed(x, 3)

    def percent(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows, body, controls = results["rows"], [], ("random", "shuffled", "perturbed", "perturbed_last")
    seeds = [r for r in rows if isinstance(r["seed"], int)]
    summary = {r["seed"]: r for r in rows if not isinstance(r["seed"], int)}
    for r in seeds:
        body.append(
            [
                str(r["seed"]),
                f"{r['without']:.3f} -> {r['with']:.3f}",
                nats(r["gain"]),
                f"{r['twin']:.3f}",
                nats(r["over_twin"]),
                f"{percent(r['twin_accuracy'])} / {percent(r['accuracy'])}",
                percent(r["intermediates"]),
                " / ".join(nats(r[c]) for c in controls),
            ]
        )
    if len(seeds) > 1:
        mean, low, high = summary["mean"], summary["min"], summary["max"]

        def spread(key: str, show: Callable[[float | None], str]) -> str:
            return f"**{show(mean[key])}** ({show(low[key])} .. {show(high[key])})"

        body.append(
            [
                f"**mean** (range), {len(seeds)} seeds",
                f"{mean['without']:.3f} -> {mean['with']:.3f}",
                spread("gain", nats),
                f"{mean['twin']:.3f}",
                spread("over_twin", nats),
                f"{percent(mean['twin_accuracy'])} / {spread('accuracy', percent)}",
                spread("intermediates", percent),
                " / ".join(nats(mean[c]) for c in controls),
            ]
        )
    header = ["seed", "answer NLL without -> with thoughts", "gain", "twin's answer NLL", "gain over the twin"]
    header += ["greedy accuracy: twin / with thoughts", "thoughts with the intermediates"]
    header += ["controls' gains: random / shuffled / perturbed / perturbed_last"]
    held = f"{results['problems']} held-out problems, torch, float32, keyed noise. "
    return markdown(header, body) + "\n\n" + held + source(results)


def levers(results: dict[str, Any]) -> str:
    """`levers_table.py`: the GSM8K LoRA run and each lever's held-out NLL with its thoughts, its gain over itself
    without them and below the no-thought twin, on all tokens, the hardest 10% and the answer tokens, beside the
    content controls' gains."""

    def nats(x: float | None) -> str:
        return signed(x, 4)

    def controls(r: dict[str, Any], view: str) -> str:
        return " / ".join(nats(r[f"{c}_{view}_gain"]) for c in ("random", "shuffled", "perturbed"))

    body = [
        [
            f"`{r['run']}`: {r['change']}",
            f"{r['all_without']:.4f} -> {r['all_with']:.4f}",
            nats(r["all_gain"]),
            nats(r["all_over_twin"]),
            controls(r, "all"),
            nats(r["hardest_gain"]),
            controls(r, "hardest"),
            nats(r["hard_gain"]),
        ]
        for r in results["rows"]
    ]
    header = ["run", "all tokens: without -> with", "gain", "below the twin"]
    header += ["controls' gains: random / shuffled / perturbed", "hardest 10%: gain", "controls' gains", "answer: gain"]
    twin = results["twin"]
    held = (
        f"{results['problems']} held-out GSM8K problems without annotations, torch, float32, thoughts drawn with seed "
        f"0; the twin (`clean_lora_nothought`): all tokens {twin['all_nll']:.4f}, hardest {twin['hardest_nll']:.4f}, "
        f"answer {twin['hard_nll']:.4f}. "
    )
    return markdown(header, body) + "\n\n" + held + source(results)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "toy": toy,
    "overhead": overhead,
    "generation": generation,
    "operators": operators,
    "modes": modes,
    "fsdp": fsdp,
    "memory": memory,
    "sharded": sharded,
    "serve": serve,
    "harness": harness,
    "bridge": bridge,
    "levers": levers,
}
"""Table name -> how its JSON is written as markdown (the name before the first "-" chooses: overhead-torch too)."""


def render(name: str, results: dict[str, Any] | None = None) -> str:
    return RENDERERS[name.split("-")[0]](load(name) if results is None else results)


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of every table block of a document."""
    return [(m["name"], m["body"]) for m in BLOCK.finditer(text)]


def publish(name: str) -> list[Path]:
    """Write table NAME, rendered from its JSON, into every document that has its markers; returns those."""
    body = render(name).rstrip("\n") + "\n"
    written = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        if f"<!-- table:{name} -->" not in text:
            continue
        doc.write_text(BLOCK.sub(lambda m: m[1] + body + m[4] if m["name"] == name else m[0], text))
        written.append(doc)
    return written
