"""PyTorch training session: AdamW on float32 master weights, grad accumulation and clipping, exact resume; under
torchrun DDP or FSDP2."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from qstar.core.data import Batch
from qstar.core.distributed import World
from qstar.core.session import Scored, check_ranks
from qstar.core.thinker import LossTerms
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.ops import HALF
from qstar.torch_backend.parallelize import parallelize
from qstar.torch_backend.qstar_model import TORCH_DTYPES, TorchQStar

STATE_FILE = "optimizer_state.pt"
FULL_ON_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Whole tensors (not shards) of a sharded model and its optimizer, gathered one at a time into rank 0's CPU memory;
the other ranks get none."""
FROM_RANK_0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
"""Whole tensors that rank 0 alone holds, broadcast one at a time: every rank keeps its shards of each and drops the
rest before the next."""
FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Where torch has a fused AdamW: one kernel per tensor instead of about ten, the same update to the last bit or two."""


def metric_values(terms: LossTerms) -> dict[str, torch.Tensor]:
    """The step's metrics, as device scalars."""
    return {"loss": terms.total, "lm": terms.lm, "policy": terms.policy, **terms.metrics}


def stacked(terms: LossTerms) -> torch.Tensor:
    """The metrics of metric_values, in its order, as one float32 vector on the device."""
    return torch.stack([v.detach().float() for v in metric_values(terms).values()])


def scalars(terms: LossTerms) -> dict[str, float]:
    """The metrics, read from the device in one copy."""
    return dict(zip(metric_values(terms), stacked(terms).tolist(), strict=True))


class Session:
    def __init__(self, model: TorchQStar, cfg: TrainConfig, world: World | None = None) -> None:
        self.model, self.cfg, self.world = model, cfg, world or World()
        net = model.backbone
        self.ops = net.ops
        net.grad_checkpoint, net.attention = cfg.grad_checkpoint, cfg.attention
        if self.ops.device.type == "cuda" and net.dtype == torch.float32:
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores; float32 matmuls would leave them idle
        if cfg.compile:
            net.compile_thought_steps()
            net.compile_sampling_loop()
        # torchrun: each rank steps on its rows; FSDP2 shards the float32 weights and all-gathers them layer by layer
        # in the compute dtype, DDP replicates them and averages the gradients while backward runs.
        self.wrapped, self.parallel = parallelize(model, cfg, self.world)
        self.ops.ranks = self.world.size
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]  # an adapter run trains a few
        self.params = [p for _, p in named]
        # Half-precision compute keeps float32 master weights: at lr 1e-6 a bf16 update would round away (sharded,
        # the float32 shards are the master weights).
        self.master = [p.detach().float().clone() if p.dtype in HALF else p for p in self.params]
        # A group per (learning-rate factor, weight decay or none): the factor 1 first, decayed first, as before
        # --head-learning-rate existed (a checkpoint's optimizer state lists its groups in this order).
        keys = [(cfg.lr_scale(n), p.ndim >= 2) for n, p in named]
        scales = sorted({s for s, _ in keys}, key=lambda s: s != 1.0)
        groups = [(s, decay) for s in scales for decay in (True, False)]
        self.lr_scales = [s for s, _ in groups]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": [m for m, k in zip(self.master, keys, strict=True) if k == g],
                    "weight_decay": cfg.weight_decay if g[1] else 0.0,
                }
                for g in groups
            ],
            lr=cfg.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=self.ops.device.type in FUSED_ADAMW_DEVICES,
        )
        self.rank_states: list[dict[str, torch.Tensor]] = []
        self.full_state: dict[str, Any] = {}
        # Thoughts are drawn from torch's default generators, which a compiled (or CUDA-graph captured) sampling loop
        # can draw from too; their state is saved with each checkpoint. Each rank draws its own.
        torch.manual_seed(cfg.seed + self.world.rank)

    def forward(self, ids: np.ndarray, mask: np.ndarray, thoughts: np.ndarray | None = None) -> LossTerms:
        """The loss terms of this rank's rows (through DDP or FSDP2, which reduce the gradients, under torchrun)."""
        if self.wrapped is not None:
            return cast(tuple[torch.Tensor, LossTerms], self.wrapped(ids, mask, thoughts))[1]
        return self.model.terms(ids, mask, thoughts)

    def syncing(self, sync: bool) -> AbstractContextManager[None]:
        """Gradients reduced across ranks in this backward (the last micro-batch) or kept local (the others). DDP of
        a half-precision model reduces every micro-batch's: its gradients leave the model for the float32 master
        weights after each (accumulate_master_grads), and a local sum kept in .grad would never be reduced."""
        ddp = isinstance(self.wrapped, DistributedDataParallel)
        if ddp and not sync and not any(m is not p for m, p in zip(self.master, self.params, strict=True)):
            return cast(DistributedDataParallel, self.wrapped).no_sync()
        if isinstance(self.wrapped, FSDPModule):
            self.wrapped.set_requires_gradient_sync(sync)
        return nullcontext()

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        """One optimizer step. The micro-batches' metrics stay on the device (summed, then averaged over the ranks
        by an all-reduce) and are read with the gradient norm in one copy, the step's only read: the non-finite
        guard needs it before the update. Half-precision gradients are accumulated in the float32 master weights'
        .grad, micro-batch by micro-batch."""
        sums: torch.Tensor | None = None
        names: list[str] = []
        for i, batch in enumerate(batches):
            with self.syncing(i == len(batches) - 1):  # all-reduce after the last micro-batch
                terms = self.forward(batch.ids, batch.mask)
                (terms.total / len(batches)).backward()
            self.accumulate_master_grads()
            names, values = list(metric_values(terms)), stacked(terms)
            sums = values if sums is None else sums + values
        assert sums is not None
        means = sums / len(batches)
        if self.world.size > 1:
            torch.distributed.all_reduce(means)
            means = means / self.world.size
        total = torch.nn.utils.clip_grad_norm_(self.master, self.cfg.max_grad_norm or math.inf)
        total = total.full_tensor() if isinstance(total, DTensor) else total  # sharded: over every shard
        *read, norm = torch.cat([means, total.detach().float().reshape(1).to(means.device)]).tolist()
        metrics = dict(zip(names, read, strict=True))
        skipped = not (math.isfinite(norm) and math.isfinite(metrics["loss"]))  # the same on every rank
        if not skipped:  # a non-finite loss or gradient would poison the weights and the optimizer state
            for group, scale in zip(self.optimizer.param_groups, self.lr_scales, strict=True):
                group["lr"] = lr * scale
            self.optimizer.step()
            with torch.no_grad():
                for m, p in zip(self.master, self.params, strict=True):
                    if m is not p:
                        p.copy_(m)
        self.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "grad_norm": norm, "skipped": float(skipped)}

    def accumulate_master_grads(self) -> None:
        """Move a micro-batch's half-precision gradients into the float32 master weights' .grad (added to those of
        the earlier micro-batches there, in float32), so that no sum of micro-batches rounds in bfloat16."""
        for m, p in zip(self.master, self.params, strict=True):
            if m is not p and p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    @property
    def cuda_devices(self) -> list[torch.device]:
        return [self.ops.device] if self.ops.device.type == "cuda" else []

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda_devices):  # the training draws go on after it
            torch.manual_seed(seed)
            yield

    def score(self, batch: Batch) -> Scored:
        with torch.no_grad():
            terms = self.forward(batch.ids, batch.mask)
            n = self.ops.to_numpy
            return Scored(scalars(terms), n(terms.nll_base), n(terms.nll_talk[0]), n(terms.thoughts).astype(np.int64))

    def random_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.cuda_devices:
            rng["cuda"] = torch.cuda.get_rng_state(self.cuda_devices[0])
        return rng

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Sharded, the float32 weights and optimizer state gathered whole onto rank 0's CPU, tensor by tensor, and
        the model's weights read from there while rank 0 saves: a checkpoint one process loads, while no device
        holds more than its shards and the tensor being gathered."""
        if self.world.size > 1:
            self.rank_states = self.world.gather(self.random_state())
        if not isinstance(self.wrapped, FSDPModule):
            yield
            return
        weights, optimizer = get_state_dict(self.wrapped, self.optimizer, options=FULL_ON_RANK_0)
        self.full_state = {"weights": weights, "optimizer": optimizer}
        if self.world.main:  # what `save` writes, in the model's dtype (a bf16 run's masters rounded as FSDP2 does)
            dtype = TORCH_DTYPES[self.model.dtype]
            names = [name for name, _ in self.model.backbone.named_parameters()]  # tied weights once
            self.model.whole = {name: weights[f"net.{name}"].to(dtype) for name in names}
        try:
            yield
        finally:
            self.model.whole, self.full_state = None, {}

    def write_state(self, directory: Path) -> None:
        state: dict[str, Any] = {**self.full_state, "rng": self.random_state()}
        if not self.full_state:
            masters = [m.detach().cpu() for m, p in zip(self.master, self.params, strict=True) if m is not p]
            state.update(optimizer=self.optimizer.state_dict(), master=masters)
        if self.rank_states:
            state["ranks"] = self.rank_states
        torch.save(state, directory / STATE_FILE)

    def read_state(self, directory: Path) -> None:
        """Sharded, rank 0 alone reads the file into its CPU memory and broadcasts it tensor by tensor, each rank
        keeping its shards (no rank ever holds the whole state on its device); replicated, every rank reads it."""
        sharded = isinstance(self.wrapped, FSDPModule)
        state = self.load_state(directory, sharded) if self.world.main or not sharded else {}
        saved, ranks = "fsdp" if "weights" in state else "ddp", state.get("ranks") or [state.get("rng")]
        if sharded:  # what the file holds, from rank 0
            saved, ranks = self.world.gather((saved, ranks))[0]
        this = "fsdp" if sharded else "ddp"
        if saved != this:
            raise ValueError(
                f"{directory} was saved by a --distributed {saved} run, this one is {this}: resume it with "
                f"--distributed {saved}"
            )
        if isinstance(self.wrapped, FSDPModule):  # two calls: set_state_dict skips the weights where none are given
            set_optimizer_state_dict(self.wrapped, self.optimizer, state.get("optimizer", {}), options=FROM_RANK_0)
            set_model_state_dict(self.wrapped, state.get("weights", {}), options=FROM_RANK_0)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            separate = [m for m, p in zip(self.master, self.params, strict=True) if m is not p]
            with torch.no_grad():
                for m, master in zip(separate, state["master"], strict=True):
                    m.copy_(master)
        check_ranks(directory, len(ranks), self.world, "torchrun --nproc-per-node")
        rng = ranks[self.world.rank]
        torch.set_rng_state(rng["cpu"].cpu())
        for device in self.cuda_devices:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)

    def load_state(self, directory: Path, sharded: bool) -> dict[str, Any]:
        """The training state file; a sharded run's onto the CPU (rank 0's, whence it is broadcast)."""
        device = torch.device("cpu") if sharded else self.ops.device
        return cast(dict[str, Any], torch.load(directory / STATE_FILE, weights_only=True, map_location=device))

    def peak_memory(self) -> float:
        return self.ops.peak_memory_gb()
