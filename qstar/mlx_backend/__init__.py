"""The MLX backend (Apple silicon, or CPU): what qstar/core/backend.py's `Backend` asks of a backend."""

from __future__ import annotations

from qstar.core.train_config import SHARDED, TrainConfig
from qstar.mlx_backend.baseline import lm_step
from qstar.mlx_backend.distributed import join
from qstar.mlx_backend.ops import MLXOps
from qstar.mlx_backend.qstar_model import build_model, select_device
from qstar.mlx_backend.session import Session

name = "mlx"


def make_ops(device: str | None = None) -> MLXOps:
    import mlx.core as mx

    if device is not None:
        mx.set_default_device(select_device("float32", device))
    return MLXOps()


def set_threads(threads: int | None, parameters: int) -> None:
    if threads is not None:
        raise ValueError(
            "--threads sets PyTorch's CPU threads: MLX chooses its own, so drop --threads with --backend mlx"
        )


def check_settings(cfg: TrainConfig) -> None:
    """What MLX cannot run of a run's settings, said before anything is written."""
    if cfg.distributed in SHARDED:
        raise ValueError(
            f"--distributed {cfg.distributed} is PyTorch's FSDP2: MLX holds the whole model in each process; drop it"
        )
    set_threads(cfg.threads, 0)


__all__ = ["name", "build_model", "Session", "join", "make_ops", "set_threads", "check_settings", "lm_step"]
