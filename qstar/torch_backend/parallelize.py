"""Several processes under torchrun, applied from outside the model (as torchtitan does): FSDP2 shards the weights,
gradients and optimizer state per decoder layer (HSDP: within groups of processes, a node's, replicated across the
groups, so the all-gathers stay inside a node), DDP replicates the model; all wrap the model's loss terms as a
module's forward, whose hooks all-gather the weights and reduce the gradients."""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from qstar.core.distributed import World, launched_node_size
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


def shard(model: TorchQStar, reshard_after_forward: bool, mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2 over a model: each decoder layer its own unit (all-gathered before its calls; with reshard_after_forward
    freed after each, else kept until its backward), the rest (embeddings, final norm, head, thought vectors, mixing
    head) the root's. Float32 shards are the master weights; a half-precision run all-gathers them in its dtype and
    reduces gradients in float32. A 2-D `mesh` (replicate, shard) makes it HSDP: sharded along its second dimension,
    the gradients reduce-scattered there and then all-reduced along the first; default, every process one shard."""
    net, dtype = model.backbone, model.backbone.dtype
    policy = MixedPrecisionPolicy()
    if dtype in HALF:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        net.float()
    # A layer returns views (its values are v_proj's output reshaped), which FSDP2 warns of in case they are updated
    # in place afterwards: qstar never does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in net.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for method in LAYER_METHODS:  # a layer is called through these (once per thought step), not forward
            register_fsdp_forward_method(layer, method)
    return cast(nn.Module, fully_shard(Terms(model), mesh=mesh, mp_policy=policy))


def shard_groups(cfg: TrainConfig, world: World) -> tuple[int, int]:
    """hsdp: (replica groups, processes a shard group spans): --shard-size, else the processes of one node, so that
    the all-gathers of every layer call stay inside a node and only the gradients cross nodes."""
    size = cfg.shard_size or launched_node_size()
    if world.size % size:  # a size above the world's too
        flag = "--shard-size" if cfg.shard_size else "--shard-size (default: the processes of one node)"
        divisors = [str(d) for d in range(1, world.size + 1) if world.size % d == 0]
        raise ValueError(
            f"{flag} {size} does not divide the run's {world.size} processes into equal shard groups: pass "
            f"--shard-size {', '.join(divisors[:-1])} or {divisors[-1]}"
        )
    return world.size // size, size


def parallelize(model: TorchQStar, cfg: TrainConfig, world: World) -> tuple[nn.Module | None, str]:
    """The wrapped loss module of a run of several processes (None alone), and how it holds the model. FSDP2 before
    the optimizer sees the parameters: they become shards."""
    if world.size == 1:
        if cfg.distributed == "hsdp":
            raise ValueError(
                "--distributed hsdp shards the model across several processes: start qstar train with torchrun, "
                "or drop --distributed hsdp"
            )
        return None, "one process"
    if cfg.sharded():
        kind = "hsdp" if cfg.distributed == "hsdp" else "fsdp"
        if cfg.compile:
            raise ValueError(f"--compile does not run under --distributed {kind} yet: pass --distributed ddp with it")
        if kind == "fsdp":
            return shard(
                model, cfg.reshard_after_forward
            ), "weights, gradients and optimizer state sharded per decoder layer (FSDP2)"
        replicas, size = shard_groups(cfg, world)
        mesh = init_device_mesh(model.ops.device.type, (replicas, size), mesh_dim_names=("replicate", "shard"))
        return shard(model, cfg.reshard_after_forward, mesh), (
            f"weights, gradients and optimizer state sharded per decoder layer within groups of {size} processes, "
            f"replicated across {replicas} groups (HSDP)"
        )
    device = model.ops.device
    wrapped = DistributedDataParallel(Terms(model), device_ids=[device] if device.type == "cuda" else None)
    return wrapped, "the whole model in each process (DDP)"
