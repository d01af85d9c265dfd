"""The yardstick of `qstar bench` on MLX: one compiled training step of mlx-lm's own model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np


def lm_step(path: Path, ids: np.ndarray, dtype: str, device: str | None) -> Callable[[], None]:
    """mlx-lm's model of the checkpoint at `path` stepping on the rows `ids`, with AdamW, compiled as a qstar step
    is."""
    from mlx_lm.utils import load_model

    from qstar.mlx_backend.qstar_model import MLX_DTYPES, select_device

    mx.set_default_device(select_device(dtype, device))
    model, _ = load_model(path)
    model.set_dtype(MLX_DTYPES[dtype])
    optimizer = optim.AdamW(learning_rate=1e-4)
    x = mx.array(ids)

    def loss_fn(model: Any, x: Any) -> Any:
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(x: Any) -> Any:
        loss, grads = grad_fn(model, x)
        optimizer.update(model, grads)
        return loss

    def step() -> None:
        mx.eval(compiled(x), state)

    return step
