"""The PyTorch backend (CUDA or CPU): `load` a checkpoint into the core API, train it with a `Session`."""

from qstar.torch_backend.api import load
from qstar.torch_backend.distributed import join
from qstar.torch_backend.train import Session

__all__ = ["load", "Session", "join"]
