"""Run under torchrun by test_distributed.py: every rank takes its rows of one global batch (padded unevenly, with
given thoughts), steps forward and backward through the data-parallel Session, and rank 0 saves the averaged
gradients and the mean loss.

    torchrun --standalone --nproc-per-node 2 tests/torch/ddp_worker.py CHECKPOINT IDS.npz OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import qstar
from qstar.core.session import Batch
from qstar.core.train_config import TrainConfig
from qstar.torch_backend import join
from qstar.torch_backend.train import Session

checkpoint, inputs, out = sys.argv[1:4]
world = join()
model = qstar.load(checkpoint, backend="torch", dtype="float64", device="cpu")
session = Session(model, TrainConfig(model=checkpoint, dtype="float64"), world)
data = np.load(inputs)
batch = world.share(Batch(data["ids"], data["mask"]))
rows = data["thoughts"].shape[0] // world.size
thoughts = data["thoughts"][world.rank * rows : (world.rank + 1) * rows]
terms = session.forward(batch.ids, batch.mask, thoughts)
terms.total.backward()
loss = world.mean({"loss": float(terms.total)})["loss"]
if world.main:
    grads = {name: p.grad.numpy() for name, p in model.parameters().items() if p.grad is not None}
    np.savez(out, loss=loss, **grads)
torch.distributed.destroy_process_group()
