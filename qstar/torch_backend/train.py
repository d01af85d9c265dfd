"""PyTorch training session: AdamW on float32 master weights, grad accumulation and clipping, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import torch

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


class Session:
    def __init__(self, model: TorchQStar, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
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
        # Thoughts are drawn from torch's default generators, which a compiled (or CUDA-graph captured) sampling loop
        # can draw from too; their state is saved with each checkpoint.
        torch.manual_seed(cfg.seed)

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        records = []
        for batch in batches:
            terms = self.model.terms(batch.ids, batch.mask)
            (terms.total / len(batches)).backward()
            records.append(scalars(terms))
        for m, p in zip(self.master, self.params, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        norm = float(torch.nn.utils.clip_grad_norm_(self.master, self.cfg.max_grad_norm or math.inf))
        skipped = not (math.isfinite(norm) and all(math.isfinite(r["loss"]) for r in records))
        if not skipped:  # a non-finite loss or gradient would poison the weights and the optimizer state
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            with torch.no_grad():
                for m, p in zip(self.master, self.params, strict=True):
                    if m is not p:
                        p.copy_(m)
        self.optimizer.zero_grad(set_to_none=True)
        return {**mean_metrics(records), "grad_norm": norm, "skipped": float(skipped)}

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
        return evaluation_metrics(records)

    def write_state(self, directory: Path) -> None:
        masters = [m.detach().cpu() for m, p in zip(self.master, self.params, strict=True) if m is not p]
        rng = {"cpu": torch.get_rng_state()}
        if self.cuda_devices:
            rng["cuda"] = torch.cuda.get_rng_state(self.cuda_devices[0])
        state = {"optimizer": self.optimizer.state_dict(), "master": masters, "rng": rng}
        torch.save(state, directory / STATE_FILE)

    def read_state(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, weights_only=True, map_location=self.ops.device)
        self.optimizer.load_state_dict(state["optimizer"])
        separate = [m for m, p in zip(self.master, self.params, strict=True) if m is not p]
        with torch.no_grad():
            for m, saved in zip(separate, state["master"], strict=True):
                m.copy_(saved)
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        for device in self.cuda_devices:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)

    def peak_memory(self) -> float:
        return self.ops.peak_memory_gb()
