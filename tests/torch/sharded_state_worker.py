"""Run under torchrun by test_distributed.py: an FSDP2 session steps, saves a checkpoint and a second session resumes
it, while spies record what each rank does. Every rank writes OUT/rank-N.json: the FSDP2 unshards during the step
and during the save, whether every parameter stayed a shard while saving, the checkpoint files it opened while
resuming, and whether the resumed weights and optimizer state (gathered on rank 0) and its random state are the saved
ones.

    torchrun --nproc-per-node 2 tests/torch/sharded_state_worker.py CHECKPOINT OUT
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from torch.distributed.tensor import DTensor

import qstar
from qstar.core.data import Batch
from qstar.core.train_config import TrainConfig
from qstar.core.trainer import save_checkpoint
from qstar.torch_backend import join
from qstar.torch_backend.qstar_model import TorchQStar
from qstar.torch_backend.session import FULL_ON_RANK_0, Session

checkpoint, out = sys.argv[1], Path(sys.argv[2])
world = join()
cfg = TrainConfig(model=checkpoint, distributed="fsdp", out=str(out / "run"))
unshards: Counter[str] = Counter()
phase = "step"
unshard = FSDPParamGroup.unshard


def counted(group: FSDPParamGroup, *args: Any, **kwargs: Any) -> None:
    """Every unshard FSDP2 makes: its hooks' before each layer call and FSDPModule.unshard's."""
    unshards[phase] += 1
    unshard(group, *args, **kwargs)


FSDPParamGroup.unshard = counted  # type: ignore[method-assign]


def session() -> Session:
    model = qstar.load(checkpoint, backend="torch", dtype="float32", device="cpu")
    return Session(cast(TorchQStar, model), cfg, world)


def whole(s: Session) -> dict[str, Any]:
    """The session's weights, optimizer state and random state, gathered on rank 0 (empty on the others)."""
    weights, optimizer = get_state_dict(s.wrapped, s.optimizer, options=FULL_ON_RANK_0)
    return {"weights": weights, "optimizer": optimizer, "rng": s.random_state()}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(torch.equal(a, b)) if isinstance(a, torch.Tensor) else a == b


first = session()
ids = np.random.default_rng(world.rank).integers(3, 100, (2, 16))
first.step([Batch(ids, np.ones(ids.shape, bool))], 1e-3)
phase = "save"
with first.gathered():
    sharded = all(isinstance(p, DTensor) for p in first.model.backbone.parameters())
    target = save_checkpoint(first, out / "run", 1, {}, cfg) if world.main else None
saved = whole(first)
world.barrier()
target = Path(world.gather(str(target))[0])
phase = "resume"
second = session()
opened: list[str] = []


def spy(event: str, args: tuple[Any, ...]) -> None:
    """Every file this process opens in the checkpoint while it resumes, by whatever reader."""
    if event == "open" and phase == "resume" and isinstance(args[0], (str, Path)) and Path(args[0]).parent == target:
        opened.append(Path(args[0]).name)


sys.addaudithook(spy)
second.read_state(target)
phase = "done"
resumed = whole(second)
gathered = bool(saved["weights"]) and bool(saved["optimizer"]["state"])  # rank 0's, none elsewhere
report = {"unshards": dict(unshards), "sharded_while_saving": sharded, "opened": opened, "gathered": gathered}
report["resumed_as_saved"] = same(saved, resumed)
(out / f"rank-{world.rank}.json").write_text(json.dumps(report))
world.barrier()
torch.distributed.destroy_process_group()
