"""The PyTorch backend (CUDA or CPU): what qstar/core/backend.py's `Backend` asks of a backend."""

from __future__ import annotations

import os

# OpenMP threads that wait for work sleep instead of spinning: a spinning thread steals the core another process
# needs, and a run beside a busy process then takes 3-6x its time (docs/PERFORMANCE.md#threads). Read when torch
# loads its OpenMP runtime, so set before the import; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qstar.core.train_config import TrainConfig  # noqa: E402
from qstar.torch_backend.baseline import lm_step  # noqa: E402
from qstar.torch_backend.distributed import join  # noqa: E402
from qstar.torch_backend.ops import TorchOps  # noqa: E402
from qstar.torch_backend.qstar_model import build_model, select_device  # noqa: E402
from qstar.torch_backend.session import Session  # noqa: E402

name = "torch"


def make_ops(device: str | None = None) -> TorchOps:
    return TorchOps(select_device(device))


ONE_THREAD_BELOW = 20_000_000
"""Parameters under which a model computes on one CPU thread unless told otherwise: its many small operations are
bound by dispatch, so a second thread adds little and loses much beside a busy process (the shipped model's 40 steps:
2 spinning threads 18.6 s alone, 43.6 s beside a busy thread; 1 thread 25.1 s and 28.1 s; docs/PERFORMANCE.md#threads);
larger ones use every core (SmolLM2-135M: 1.3x faster idle on 2 threads, as fast beside a busy process)."""


def set_threads(threads: int | None, parameters: int) -> None:
    torch.set_num_threads(threads or (1 if parameters < ONE_THREAD_BELOW else CORES))


CORES = torch.get_num_threads()
"""PyTorch's own choice at import: one thread a physical core."""


def check_settings(cfg: TrainConfig) -> None:
    """PyTorch runs every setting of a run (what needs several processes is checked where they start)."""


__all__ = ["name", "build_model", "Session", "join", "make_ops", "set_threads", "check_settings", "lm_step"]
