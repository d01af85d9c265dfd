"""Write docs/REAL.md's table of the GSM8K LoRA pair and its levers from the measurements of real_runs.sh.

    bash benchmarks/real_runs.sh GGUF runs/real clean_lora_nothought clean_lora [clean_lora_LEVER ...]
    python benchmarks/levers_table.py [--commit C]

Reads benchmarks/results/real/NAME.json (the held-out scoring of run NAME) and NAME-CONTROL.json (its content
controls) for every run of LEVERS measured, and the twin's clean_lora_nothought.json; records
benchmarks/results/levers-gsm8k.json and publishes it (benchmarks/tables.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402

COMMAND = "bash benchmarks/real_runs.sh GGUF runs/real NAME... && python benchmarks/levers_table.py"
TWIN = "clean_lora_nothought"
LEVERS = {
    "clean_lora": "LoRA Quiet-STaR: 4 thought tokens at every 4th position, 2 a position, lr 5e-4",
    "clean_lora_long": "12 thought tokens at every 8th position",
    "clean_lora_headlr": "mixing head and thought vectors at lr 5e-3 (10x)",
    "clean_lora_headlr_entropy": "the same with an entropy bonus of 0.01",
    "clean_lora_wide": "4 thoughts a position at every 8th position",
}
"""Run name -> what it changes (after the first: from clean_lora, one change each; the same twin for all)."""
CONTROLS = ("random", "shuffled", "perturbed")
VIEWS = ("all", "hard", "hardest")


def run_row(
    name: str, measured: dict[str, Any], controls: dict[str, dict[str, Any]], twin: dict[str, Any]
) -> dict[str, Any]:
    """One run's NLLs and gains per view, its gain below the twin, and each measured control's gains."""
    return {
        "run": name,
        "change": LEVERS[name],
        **{f"{v}_without": measured[v]["nll_base"] for v in VIEWS},
        **{f"{v}_with": measured[v]["nll_talk"] for v in VIEWS},
        **{f"{v}_gain": measured[v]["gain"] for v in VIEWS},
        **{f"{v}_over_twin": twin[v]["nll_base"] - measured[v]["nll_talk"] for v in VIEWS},
        **{f"{c}_{v}_gain": controls[c][v]["gain"] if c in controls else None for c in CONTROLS for v in VIEWS},
        "mixing_weight": measured["mixing_weight"],
    }


def main(commit: str | None, results: Path = tables.RESULTS / "real") -> None:
    def read(name: str) -> dict[str, Any] | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    twin = read(TWIN)
    if twin is None:
        raise SystemExit(f"no {TWIN}.json in {results}: run benchmarks/real_runs.sh GGUF runs/real {TWIN} first")
    rows = []
    for name in LEVERS:
        measured = read(name)
        if measured is not None:
            controls = {c: found for c in CONTROLS if (found := read(f"{name}-{c}")) is not None}
            rows.append(run_row(name, measured, controls, twin))
    twin_row = {f"{v}_nll": twin[v]["nll_base"] for v in VIEWS}
    meta = {"commit": commit} if commit else {}
    tables.record("levers-gsm8k", rows, COMMAND, problems=twin["count"], twin=twin_row, **meta)
    print("\n".join(str(p) for p in tables.publish("levers-gsm8k")) or "no document has the levers-gsm8k markers")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", help="the commit the runs trained and measured at (default: this checkout's)")
    main(parser.parse_args().commit)
