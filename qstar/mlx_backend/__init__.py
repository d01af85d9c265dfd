"""The MLX backend (Apple silicon, or CPU): `load` a checkpoint into the core API, train it with a `Session`."""

from qstar.mlx_backend.api import load
from qstar.mlx_backend.distributed import join
from qstar.mlx_backend.train import Session

__all__ = ["load", "Session", "join"]
