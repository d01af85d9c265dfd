"""Write docs/TOY.md's and the README's toy-effect tables from the runs of benchmarks/toy_effect_runs.sh.

    bash benchmarks/toy_effect_runs.sh /tmp/toy && python benchmarks/toy_table.py /tmp/toy

Records benchmarks/results/toy-effect.json, toy-recipe.json and toy-chains.json and publishes them
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

COMMAND = "bash benchmarks/toy_effect_runs.sh OUT && python benchmarks/toy_table.py OUT"
FLAGS = {
    "before": "(the shipped model, not trained)",
    "seed0": "`qstar train`",
    "seed1": "`--seed 1`",
    "seed2": "`--seed 2`",
    "policy0": "`--policy-weight 0`",
    "mixing_only": "`--train-only mixing_head`",
    "mlx": "`--backend mlx --iters 100 --warmup-steps 5`",
    "scale100": "`--embedding-scale 100`",
    "init_dashes": "`--init-token=---`",
    "lookahead4": "`--lookahead 4`",
    "thought8": "`--thought-tokens 8`",
}
KEYS = ("answer_nll_base", "answer_nll_thought", "all_nll_base", "all_nll_thought", "mixing_weight", "thoughts_correct")


def row(out: Path, name: str) -> dict[str, Any]:
    result = json.loads((out / f"{name}.json").read_text())
    wall = out / f"{name}.wall"
    return {
        "name": name,
        "flags": FLAGS[name],
        "wall_s": float(wall.read_text()) if wall.exists() else None,
        **{k: result["all"][k] for k in KEYS},
        "answer_gain": result["all"]["answer_nll_base"] - result["all"]["answer_nll_thought"],
        "all_gain": result["all"]["all_nll_base"] - result["all"]["all_nll_thought"],
    }


def mean_row(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"name": "mean", "flags": label}
    for key in ("wall_s", "answer_gain", "all_gain", *KEYS):
        values = np.array([r[key] for r in rows], dtype=float)
        out[key], out[key + "_sd"] = float(values.mean()), float(values.std(ddof=1))
    return out


def main(out: Path) -> None:
    seeds = [row(out, f"seed{i}") for i in range(3)]
    effect = [row(out, "before"), *seeds, mean_row(seeds, "mean ± sd of the 3 seeds")]
    effect += [row(out, n) for n in ("policy0", "mixing_only", "mlx")]
    tables.record("toy-effect", effect, COMMAND, threads=1)
    short = [r for r in effect if r["name"] in ("before", "mean", "mlx")]  # the README's rows
    tables.record("toy-effect-short", short, COMMAND, threads=1)
    recipe = [seeds[0], *(row(out, n) for n in ("scale100", "init_dashes", "lookahead4", "thought8"))]
    tables.record("toy-recipe", recipe, COMMAND, threads=1)
    by_chain = json.loads((out / "seed0.json").read_text())["by_chain"]
    chains = [
        {"chain": int(c), **{k: v for k, v in s.items() if k in KEYS or k == "documents"}} for c, s in by_chain.items()
    ]
    tables.record("toy-chains", chains, COMMAND, threads=1)
    for name in ("toy-effect", "toy-effect-short", "toy-recipe", "toy-chains"):
        print(name, [str(p) for p in tables.publish(name)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the OUT_DIR of benchmarks/toy_effect_runs.sh")
    main(parser.parse_args().out)
