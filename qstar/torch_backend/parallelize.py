"""Several processes under torchrun, applied from outside the model (as torchtitan does): FSDP2 shards the weights,
gradients and optimizer state per decoder layer, DDP replicates the model; both wrap the model's loss terms as a
module's forward, whose hooks all-gather the weights and reduce the gradients."""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from qstar.core.distributed import World
from qstar.core.thinker import LossTerms
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.backbone import LAYER_METHODS
from qstar.torch_backend.ops import HALF
from qstar.torch_backend.qstar_model import TorchQStar


class Terms(nn.Module):
    """A model's loss terms as a module's forward: what DistributedDataParallel and FSDP2 wrap. The loss comes first
    in the output, a tensor their hooks can see (they do not look inside a LossTerms)."""

    def __init__(self, model: TorchQStar) -> None:
        super().__init__()
        self.net, self.qstar = model.backbone, model

    def forward(
        self, ids: np.ndarray, mask: np.ndarray, thoughts: np.ndarray | None = None
    ) -> tuple[torch.Tensor, LossTerms]:
        terms = self.qstar.terms(ids, mask, thoughts)
        return terms.total, terms


def shard(model: TorchQStar, reshard_after_forward: bool) -> nn.Module:
    """FSDP2 over a model: each decoder layer its own unit (all-gathered before its calls; with reshard_after_forward
    freed after each, else kept until its backward), the rest (embeddings, final norm, head, thought vectors, mixing
    head) the root's. Float32 shards are the master weights; a half-precision run all-gathers them in its dtype and
    reduces gradients in float32."""
    net, dtype = model.backbone, model.backbone.dtype
    policy = MixedPrecisionPolicy()
    if dtype in HALF:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        net.float()
    # A layer returns views (its values are v_proj's output reshaped), which FSDP2 warns of in case they are updated
    # in place afterwards: qstar never does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in net.model.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for method in LAYER_METHODS:  # a layer is called through these (once per thought step), not forward
            register_fsdp_forward_method(layer, method)
    return cast(nn.Module, fully_shard(Terms(model), mp_policy=policy))


def parallelize(model: TorchQStar, cfg: TrainConfig, world: World) -> tuple[nn.Module | None, str]:
    """The wrapped loss module of a run of several processes (None alone), and how it holds the model. FSDP2 before
    the optimizer sees the parameters: they become shards."""
    if world.size == 1:
        return None, "one process"
    if cfg.sharded():
        if cfg.compile:
            raise ValueError("--compile does not run under --distributed fsdp yet: pass --distributed ddp with it")
        return shard(
            model, cfg.reshard_after_forward
        ), "weights, gradients and optimizer state sharded per decoder layer (FSDP2)"
    device = model.ops.device
    wrapped = DistributedDataParallel(Terms(model), device_ids=[device] if device.type == "cuda" else None)
    return wrapped, "the whole model in each process (DDP)"
