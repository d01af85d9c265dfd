"""The yardstick of `qstar bench` on PyTorch: one training step of transformers' own causal LM."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qstar.torch_backend.qstar_model import TORCH_DTYPES, select_device
from qstar.torch_backend.session import FUSED_ADAMW_DEVICES


def lm_step(path: Path, ids: np.ndarray, dtype: str, device: str | None) -> Callable[[], None]:
    """transformers' model of the checkpoint at `path` (SDPA attention) stepping on the rows `ids`, with the same
    AdamW as a qstar session, so that a ratio compares the steps, not the optimizers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bars between the benchmark's own lines
    device = select_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa")
    model.to(device)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type in FUSED_ADAMW_DEVICES)
    x = torch.from_numpy(ids).to(device)

    def step() -> None:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
