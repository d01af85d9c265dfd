"""Run under torchrun by test_distributed.py and test_hsdp.py: every rank takes its rows of one global batch (padded
unevenly, with given thoughts), steps forward and backward through the data-parallel Session (DDP, FSDP2 or HSDP), and
rank 0 saves the averaged gradients (whole, gathered from the shards under FSDP2 and HSDP) and the mean loss.

    torchrun --standalone --nproc-per-node 2 tests/torch/ddp_worker.py CHECKPOINT IDS.npz OUT.npz ddp|fsdp|hsdp [ckpt]

(`ckpt`: with activation checkpointing, each layer call recomputed in backward.)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import qstar
from qstar.core.data import Batch
from qstar.core.train_config import SHARDED, TrainConfig
from qstar.torch_backend import join
from qstar.torch_backend.session import Session

checkpoint, inputs, out, distributed = sys.argv[1:5]
recompute = sys.argv[5:] == ["ckpt"]
world = join()
model = qstar.load(checkpoint, backend="torch", dtype="float64", device="cpu")
session = Session(
    model, TrainConfig(model=checkpoint, dtype="float64", distributed=distributed, grad_checkpoint=recompute), world
)
data = np.load(inputs)
batch = world.share(Batch(data["ids"], data["mask"]))
rows = data["thoughts"].shape[0] // world.size
thoughts = data["thoughts"][world.rank * rows : (world.rank + 1) * rows]
terms = session.forward(batch.ids, batch.mask, thoughts)
terms.total.backward()
loss = world.mean({"loss": float(terms.total)})["loss"]
grads = {name: p.grad for name, p in model.parameters().items() if p.grad is not None}
grads = {name: (g.full_tensor() if isinstance(g, DTensor) else g).numpy() for name, g in grads.items()}
assert isinstance(session.wrapped, FSDPModule) == (distributed in SHARDED)
if world.main:
    np.savez(out, loss=loss, **grads)
    print(session.parallel)  # how the processes held the model (HSDP: its groups)
world.barrier()  # no rank leaves while another still talks to it (gloo aborts on a closed peer)
torch.distributed.destroy_process_group()
