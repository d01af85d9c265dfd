"""Write docs/REAL.md's and the README's bridge-world table from the measurements of benchmarks/bridge_runs.sh.

    bash benchmarks/bridge_runs.sh GGUF runs/bridge && python benchmarks/bridge_table.py [--commit C]

Reads benchmarks/results/bridge/pair_sN.json (Quiet-STaR seed N beside its no-thought twin, with the content
controls) and pair_sN_last.json (the perturbed_last control) for every seed measured, records
benchmarks/results/bridge-seeds.json (one row a seed, then their mean and range) and publishes it
(benchmarks/tables.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402

COMMAND = "bash benchmarks/bridge_runs.sh GGUF runs/bridge && python benchmarks/bridge_table.py"
CONTROLS = ("random", "shuffled", "perturbed", "perturbed_last")
KEYS = ("without", "with", "gain", "twin", "over_twin", "twin_accuracy", "accuracy", "intermediates", *CONTROLS)


def seed_row(pair: dict[str, Any], last: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """One seed's numbers: answer NLLs, gains, accuracies and each control's gain (None where not measured)."""
    answer, twin = pair["answer"], pair["twin"]
    controls = {**pair, **(last or {})}
    return {
        "seed": seed,
        "without": answer["nll_base"],
        "with": answer["nll_talk"],
        "gain": answer["gain"],
        "twin": twin["answer"]["nll_base"],
        "over_twin": twin["answer"]["nll_base"] - answer["nll_talk"],
        "twin_accuracy": twin["accuracy"],
        "accuracy": pair["accuracy_with_thoughts"],
        "intermediates": pair["thoughts_with_intermediates"],
        **{c: controls[f"control_{c}"]["answer"]["gain"] if f"control_{c}" in controls else None for c in CONTROLS},
    }


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mean and the range (min, max) of every key over the seeds that have it."""
    out: list[dict[str, Any]] = [{"seed": "mean"}, {"seed": "min"}, {"seed": "max"}]
    for key in KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        stats = (sum(values) / len(values), min(values), max(values)) if values else (None, None, None)
        for row, value in zip(out, stats, strict=True):
            row[key] = value
    return out


def main(commit: str | None, results: Path = tables.RESULTS / "bridge") -> None:
    rows = []
    for path in sorted(results.glob("pair_s*.json")):
        name = path.stem.removeprefix("pair_s")
        if not name.isdigit():
            continue
        last = results / f"pair_s{name}_last.json"
        rows.append(
            seed_row(json.loads(path.read_text()), json.loads(last.read_text()) if last.exists() else None, int(name))
        )
    if not rows:
        raise SystemExit(f"no pair_sN.json in {results}: run benchmarks/bridge_runs.sh first")
    meta = {"commit": commit} if commit else {}
    tables.record("bridge-seeds", rows + summary_rows(rows), COMMAND, problems=256, **meta)
    print("\n".join(str(p) for p in tables.publish("bridge-seeds")) or "no document has the bridge-seeds markers")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", help="the commit the runs trained and measured at (default: this checkout's)")
    main(parser.parse_args().commit)
