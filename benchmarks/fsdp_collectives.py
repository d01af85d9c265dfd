"""FSDP2's collectives and time per training step, each layer resharded after every call (the default) or kept
gathered from its first call until its backward (--no-reshard-after-forward), run under torchrun:

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_collectives.py --publish
    torchrun --standalone --nproc-per-node 4 benchmarks/fsdp_collectives.py --shard-size 2

A decoder layer is called once for the base pass and once per thought step (qstar/core/thinker.py), so resharding
after each call all-gathers its weights about k + 3 times in forward and again in backward; keeping them costs the
whole model's (compute-dtype) weights in memory during a step. With --shard-size, HSDP (--distributed hsdp): the
all-gathers and reduce-scatters stay within a shard group (consecutive ranks, a node's on a cluster) and only the
gradient shards are all-reduced across the replicas. Either way the loss all-reduces a few scalars over all ranks
(its masked means' global token counts, qstar/core/losses.py). Counts are per rank and step; the model is the shipped
toy (4 layers) at its recipe (k=4, A=2, P=2), batch 2 per rank, float32 on gloo.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown, publish, record, render  # noqa: E402

import qstar  # noqa: E402
from qstar.core.data import Batch  # noqa: E402
from qstar.core.train_config import TrainConfig  # noqa: E402
from qstar.torch_backend import join  # noqa: E402
from qstar.torch_backend.qstar_model import TorchQStar  # noqa: E402
from qstar.torch_backend.session import Session  # noqa: E402
from qstar.weights import DEFAULT_MODEL  # noqa: E402

CALLS: Counter[tuple[str, str]] = Counter()
COUNTS = ("all-reduces", "all")
"""The loss's all-reduces of its token counts (a scalar each)."""
COLUMNS = {
    "fsdp": {("all-gathers", "all"): "all_gathers", ("reduce-scatters", "all"): "reduce_scatters", COUNTS: "counts"},
    "hsdp": {
        ("all-gathers", "shard group"): "all_gathers",
        ("reduce-scatters", "shard group"): "reduce_scatters",
        ("all-reduces", "replicas"): "all_reduces",
        COUNTS: "counts",
    },
}
"""The collectives each kind of sharding makes, by the processes they span, and their keys in a row."""


def span(group: dist.ProcessGroup | None) -> str:
    """The processes a collective spans: all, a shard group (consecutive ranks) or a shard's replicas (strided)."""
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    if len(ranks) == dist.get_world_size():
        return "all"
    return "shard group" if ranks[-1] - ranks[0] == len(ranks) - 1 else "replicas"


def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        CALLS[name, span(kwargs.get("group"))] += 1
        return fn(*args, **kwargs)

    return call


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--shard-size", type=int, help="HSDP: shard within groups of this many processes")
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs table")
    args = parser.parse_args()
    if args.publish and args.shard_size:
        parser.error("--publish writes the FSDP2 table: drop it with --shard-size")
    torch.set_num_threads(1)
    world = join()
    distributed = "hsdp" if args.shard_size else "fsdp"
    dist.all_gather_single = counted("all-gathers", dist.all_gather_single)
    dist.reduce_scatter_single = counted("reduce-scatters", dist.reduce_scatter_single)
    dist.all_reduce = counted("all-reduces", dist.all_reduce)
    rows = []
    for reshard in (True, False):
        model = qstar.load(args.model, backend="torch", dtype="float32", device="cpu")
        cfg = TrainConfig(
            model=args.model, distributed=distributed, shard_size=args.shard_size, reshard_after_forward=reshard
        )
        session = Session(cast(TorchQStar, model), cfg, world)
        ids = np.random.default_rng(world.rank).integers(4, model.config.vocab_size, (2, args.seq_len))
        batch = Batch(ids, np.ones(ids.shape, bool))
        times, counts = [], []
        for _ in range(args.steps + 1):  # the first step initialises FSDP2 lazily: not counted
            CALLS.clear()
            start = time.perf_counter()
            session.step([batch], 1e-5)
            times.append(time.perf_counter() - start)
            counts.append(CALLS.copy())
        columns = COLUMNS[distributed]
        assert all(c == counts[1] and set(c) <= set(columns) for c in counts[1:]), counts  # the same every step
        collectives = {key: counts[1][kind] for kind, key in columns.items()}
        rows.append({"reshard_after_forward": reshard, **collectives, "step_s": statistics.median(times[1:])})
    if world.main:
        command = f"torchrun --standalone --nproc-per-node {world.size} benchmarks/fsdp_collectives.py"
        units = model.config.num_layers + 1
        if args.shard_size:  # not published: the FSDP2 table's JSON and renderer are its own
            header = ["reshard after forward", "all-gathers (shard group)", "reduce-scatters (shard group)"]
            header += ["all-reduces (across replicas)", "loss's all-reduces (all ranks)", "step"]
            body = [
                [
                    "yes (default)" if r["reshard_after_forward"] else "no",
                    *(str(r[key]) for key in COLUMNS["hsdp"].values()),
                    f"{r['step_s']:.3f} s",
                ]
                for r in rows
            ]
            print(markdown(header, body))
            print(f"\n{units} FSDP units, {world.size} CPU ranks (gloo) in shard groups of {args.shard_size}, with")
            print(f"`{command} --shard-size {args.shard_size}`")
        else:
            results = {"command": command, "date": "-", "machine": "-", "units": units, "ranks": world.size}
            print(render("fsdp", results | {"rows": rows}))
            if args.publish:
                record("fsdp", rows, command + " --publish", units=units, ranks=world.size)
                publish("fsdp")
    dist.destroy_process_group()
