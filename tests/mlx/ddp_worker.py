"""Run under mlx.launch by test_mlx_distributed.py: every rank takes its rows of one global batch (padded unevenly,
with given thoughts), computes its gradients as the compiled step does and averages them over the ranks; rank 0
saves the averaged gradients and the mean loss.

    mlx.launch -n 2 --backend ring -- python tests/mlx/ddp_worker.py CHECKPOINT IDS.npz OUT.npz
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np

import qstar
from qstar.core.data import Batch
from qstar.core.train_config import TrainConfig
from qstar.mlx_backend import join
from qstar.mlx_backend.ops import flat
from qstar.mlx_backend.session import Session

checkpoint, inputs, out = sys.argv[1:4]
world = join()
model = qstar.load(checkpoint, backend="mlx", dtype="float64", device="cpu")
session = Session(model, TrainConfig(model=checkpoint, dtype="float64"), world)
data = np.load(inputs)
batch = world.share(Batch(data["ids"], data["mask"]))
rows = data["thoughts"].shape[0] // world.size
given = mx.array(data["thoughts"][world.rank * rows : (world.rank + 1) * rows])
terms = session.terms
session.terms = lambda ids, valid, thoughts=None: terms(ids, valid, given)  # type: ignore[method-assign]
metrics, grads = session.gradients(*session.inputs(batch), None, 1)
grads = session.averaged(grads)
mx.eval(grads)  # on every rank: the all-reduce is lazy, a rank that skips it leaves the others waiting
loss = world.mean({"loss": float(metrics["loss"])})["loss"]
if world.main:
    np.savez(out, loss=loss, **{name: np.array(g) for name, g in flat(grads).items()})
