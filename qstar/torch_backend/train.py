"""PyTorch training session: AdamW on float32 master weights, grad accumulation and clipping, exact resume."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qstar.core.distributed import World
from qstar.core.session import Batch, evaluation_metrics, hard_token_sums, mean_metrics
from qstar.core.thinker import LossTerms
from qstar.core.train_config import TrainConfig
from qstar.torch_backend.api import TorchQStar
from qstar.torch_backend.ops import HALF

STATE_FILE = "optimizer_state.pt"
FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Where torch has a fused AdamW: one kernel per tensor instead of about ten, the same update to the last bit or two."""


def scalars(terms: LossTerms) -> dict[str, float]:
    """The step's metrics, read from the device in one copy."""
    values = {"loss": terms.total, "lm": terms.lm, "policy": terms.policy, **terms.metrics}
    read = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values, read, strict=True))


class Terms(nn.Module):
    """A model's loss terms as a module's forward: what DistributedDataParallel wraps (it hooks forward and backward
    to all-reduce the gradients in buckets while backward runs)."""

    def __init__(self, model: TorchQStar) -> None:
        super().__init__()
        self.net, self.qstar = model.backbone, model

    def forward(self, ids: np.ndarray, mask: np.ndarray, thoughts: np.ndarray | None = None) -> LossTerms:
        return self.qstar.terms(ids, mask, thoughts)


class Session:
    def __init__(self, model: TorchQStar, cfg: TrainConfig, world: World | None = None) -> None:
        self.model, self.cfg, self.world = model, cfg, world or World()
        net = model.backbone
        self.ops = net.ops
        net.grad_checkpoint, net.attention = cfg.grad_checkpoint, cfg.attention
        if cfg.compile:
            net.compile_thought_steps()
            net.compile_sampling_loop()
        self.params = [p for p in net.parameters() if p.requires_grad]  # an adapter run trains a few
        # Half-precision compute keeps float32 master weights: at lr 1e-6 a bf16 update would round away.
        self.master = [p.detach().float().clone() if p.dtype in HALF else p for p in self.params]
        decay = [m for m, p in zip(self.master, self.params, strict=True) if p.ndim >= 2]
        no_decay = [m for m, p in zip(self.master, self.params, strict=True) if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=self.ops.device.type in FUSED_ADAMW_DEVICES,
        )
        self.ddp: DistributedDataParallel | None = None
        if self.world.size > 1:  # torchrun: each rank steps on its rows, gradients averaged while backward runs
            self.ops.ranks = self.world.size
            devices = [self.ops.device] if self.ops.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(Terms(model), device_ids=devices)
        self.rank_states: list[dict[str, torch.Tensor]] = []
        # Thoughts are drawn from torch's default generators, which a compiled (or CUDA-graph captured) sampling loop
        # can draw from too; their state is saved with each checkpoint. Each rank draws its own.
        torch.manual_seed(cfg.seed + self.world.rank)

    def forward(self, ids: np.ndarray, mask: np.ndarray, thoughts: np.ndarray | None = None) -> LossTerms:
        """The loss terms of this rank's rows (through DDP, which all-reduces the gradients, under torchrun)."""
        if self.ddp is not None:
            return cast(LossTerms, self.ddp(ids, mask, thoughts))
        return self.model.terms(ids, mask, thoughts)

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        records = []
        for i, batch in enumerate(batches):
            accumulating = self.ddp is not None and i < len(batches) - 1  # all-reduce after the last micro-batch
            with self.ddp.no_sync() if accumulating else nullcontext():  # type: ignore[union-attr]
                terms = self.forward(batch.ids, batch.mask)
                (terms.total / len(batches)).backward()
            records.append(scalars(terms))
        metrics = self.world.mean(mean_metrics(records))
        for m, p in zip(self.master, self.params, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        norm = float(torch.nn.utils.clip_grad_norm_(self.master, self.cfg.max_grad_norm or math.inf))
        skipped = not (math.isfinite(norm) and math.isfinite(metrics["loss"]))  # the same on every rank
        if not skipped:  # a non-finite loss or gradient would poison the weights and the optimizer state
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            with torch.no_grad():
                for m, p in zip(self.master, self.params, strict=True):
                    if m is not p:
                        p.copy_(m)
        self.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "grad_norm": norm, "skipped": float(skipped)}

    @property
    def cuda_devices(self) -> list[torch.device]:
        return [self.ops.device] if self.ops.device.type == "cuda" else []

    def evaluate(self, batches: list[Batch], seed: int) -> dict[str, float]:
        with torch.random.fork_rng(devices=self.cuda_devices), torch.no_grad():  # the training draws go on after it
            torch.manual_seed(seed)
            records = []
            for batch in batches:
                terms = self.model.terms(batch.ids, batch.mask)
                records.append(scalars(terms))
                if batch.hard is not None:
                    streams = self.model.layout(batch.ids.shape[1]).streams
                    base, talk = self.ops.to_numpy(terms.nll_base), self.ops.to_numpy(terms.nll_talk[0])
                    records[-1].update(hard_token_sums(base, talk, streams, batch.hard))
        return evaluation_metrics([self.world.mean(mean_metrics(records))])  # hard-token sums over every rank

    def random_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.cuda_devices:
            rng["cuda"] = torch.cuda.get_rng_state(self.cuda_devices[0])
        return rng

    def gather_state(self) -> None:
        if self.world.size > 1:
            self.rank_states = self.world.gather(self.random_state())

    def write_state(self, directory: Path) -> None:
        masters = [m.detach().cpu() for m, p in zip(self.master, self.params, strict=True) if m is not p]
        state = {"optimizer": self.optimizer.state_dict(), "master": masters, "rng": self.random_state()}
        if self.rank_states:
            state["ranks"] = self.rank_states
        torch.save(state, directory / STATE_FILE)

    def read_state(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, weights_only=True, map_location=self.ops.device)
        self.optimizer.load_state_dict(state["optimizer"])
        separate = [m for m, p in zip(self.master, self.params, strict=True) if m is not p]
        with torch.no_grad():
            for m, saved in zip(separate, state["master"], strict=True):
                m.copy_(saved)
        ranks = state.get("ranks") or [state["rng"]]
        if len(ranks) != self.world.size:
            raise ValueError(
                f"{directory} was saved by a run of {len(ranks)} process(es), this one has {self.world.size}: resume "
                f"it with as many (torchrun --nproc-per-node {len(ranks)})"
            )
        rng = ranks[self.world.rank]
        torch.set_rng_state(rng["cpu"].cpu())
        for device in self.cuda_devices:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)

    def peak_memory(self) -> float:
        return self.ops.peak_memory_gb()
