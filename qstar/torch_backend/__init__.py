"""The PyTorch backend (CUDA or CPU): what qstar/core/backend.py's `Backend` asks of a backend."""

from __future__ import annotations

import torch

from qstar.core.train_config import TrainConfig
from qstar.torch_backend.baseline import lm_step
from qstar.torch_backend.distributed import join
from qstar.torch_backend.ops import TorchOps
from qstar.torch_backend.qstar_model import build_model, default_device
from qstar.torch_backend.session import Session

name = "torch"


def make_ops(device: str | None = None) -> TorchOps:
    return TorchOps(device or default_device())


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def check_settings(cfg: TrainConfig) -> None:
    """PyTorch runs every setting of a run (what needs several processes is checked where they start)."""


__all__ = ["name", "build_model", "Session", "join", "make_ops", "set_threads", "check_settings", "lm_step"]
