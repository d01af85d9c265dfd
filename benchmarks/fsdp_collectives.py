"""FSDP2's collectives and time per training step, each layer resharded after every call (the default) or kept
gathered from its first call until its backward (--no-reshard-after-forward), run under torchrun:

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_collectives.py --publish

A decoder layer is called once for the base pass and once per thought step (qstar/core/thinker.py), so resharding
after each call all-gathers its weights about k + 3 times in forward and again in backward; keeping them costs the
whole model's (compute-dtype) weights in memory during a step. Counts are per rank and step; the model is the shipped
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
from tables import publish, record, render  # noqa: E402

import qstar  # noqa: E402
from qstar.core.data import Batch  # noqa: E402
from qstar.core.train_config import TrainConfig  # noqa: E402
from qstar.torch_backend import join  # noqa: E402
from qstar.torch_backend.qstar_model import TorchQStar  # noqa: E402
from qstar.torch_backend.session import Session  # noqa: E402
from qstar.weights import DEFAULT_MODEL  # noqa: E402

CALLS: Counter[str] = Counter()


def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return call


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--publish", action="store_true", help="record the results and write the docs table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = join()
    dist.all_gather_single = counted("all-gathers", dist.all_gather_single)
    dist.reduce_scatter_single = counted("reduce-scatters", dist.reduce_scatter_single)
    rows = []
    for reshard in (True, False):
        model = qstar.load(args.model, backend="torch", dtype="float32", device="cpu")
        cfg = TrainConfig(model=args.model, distributed="fsdp", reshard_after_forward=reshard)
        session = Session(cast(TorchQStar, model), cfg, world)
        ids = np.random.default_rng(world.rank).integers(4, model.config.vocab_size, (2, args.seq_len))
        batch = Batch(ids, np.ones(ids.shape, bool))
        times, counts = [], []
        for _ in range(args.steps + 1):  # the first step initialises FSDP2 lazily: not counted
            CALLS.clear()
            start = time.perf_counter()
            session.step([batch], 1e-5)
            times.append(time.perf_counter() - start)
            counts.append(dict(CALLS))
        gathers = {c["all-gathers"] for c in counts[1:]}
        scatters = {c["reduce-scatters"] for c in counts[1:]}
        assert len(gathers) == len(scatters) == 1, (gathers, scatters)  # the same every step
        rows.append(
            {
                "reshard_after_forward": reshard,
                "all_gathers": gathers.pop(),
                "reduce_scatters": scatters.pop(),
                "step_s": statistics.median(times[1:]),
            }
        )
    if world.main:
        command = "torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_collectives.py"
        results = {"command": command, "date": "-", "machine": "-", "units": model.config.num_layers + 1}
        results |= {"ranks": world.size, "rows": rows}
        print(render("fsdp", results))
        if args.publish:
            record("fsdp", rows, command + " --publish", units=results["units"], ranks=world.size)
            publish("fsdp")
    dist.destroy_process_group()
