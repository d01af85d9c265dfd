"""MLX training session: one compiled step (thought sampling, loss, gradients, clipping, AdamW on float32 master
weights), grad accumulation, and exact resume.

The compiled functions capture the model, the optimizer and MLX's global random state as implicit inputs and
outputs (`mx.compile(..., inputs=state, outputs=state)`), so the thoughts are drawn with `mx.random` inside the
graph and every call advances the random key exactly as an uncompiled run would. Shapes are fixed by the config
(batch_size x max_seq_length, a float padding mask always present), so nothing is traced again after the first step.
That key is MLX's one global (per-thread) key: a process trains one session at a time.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from qstar.core.data import Batch
from qstar.core.distributed import World
from qstar.core.sampling import DeviceNoise
from qstar.core.session import Scored, check_ranks, mean_metrics
from qstar.core.thinker import LossTerms
from qstar.core.train_config import TrainConfig
from qstar.mlx_backend.ops import HALF, flat, random_state
from qstar.mlx_backend.qstar_model import MLXQStar, read_safetensors

STATE_FILE = "optimizer_state.safetensors"
META_FILE = "optimizer_state.json"
FORMAT = 1

Tree = Any
Metrics = dict[str, mx.array]


class AdamW(optim.AdamW):
    """torch-style AdamW: bias correction, and weight decay only for parameters with ndim >= 2 (biases, norms and
    thought vectors get none). One optimizer with a per-parameter rule keeps a single step counter and learning
    rate in its state (mlx.optimizers has no parameter groups)."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim >= 2:
            return super().apply_single(gradient, parameter, state)
        return optim.Adam.apply_single(self, gradient, parameter, state)


def random_key() -> np.ndarray:
    """The calling thread's MLX random key, (2,) uint32."""
    return np.array(random_state(), dtype=np.uint32)


def set_random_key(key: np.ndarray) -> None:
    """Set MLX's random key to any value: mx.random.key(seed) is [seed >> 32, seed & 0xffffffff], and Python offers no
    other way to write mx.random.state."""
    hi, lo = (int(k) for k in np.asarray(key, dtype=np.uint32))
    mx.random.seed((hi << 32) | lo)
    if not (random_key() == np.array([hi, lo], np.uint32)).all():
        raise RuntimeError("this MLX version's mx.random.seed does not set the key [seed >> 32, seed & 0xffffffff]")


def assign(tree: Tree, values: dict[str, mx.array]) -> None:
    """Replace leaves of a nested dict/list tree in place (compiled functions hold on to the containers)."""
    for path, value in values.items():
        node, *parts = tree, *path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        node[int(last) if isinstance(node, list) else last] = value


def scalars(terms: LossTerms) -> Metrics:
    return {"loss": terms.total, "lm": terms.lm, "policy": terms.policy, **terms.metrics}


class Session:
    def __init__(self, model: MLXQStar, cfg: TrainConfig, world: World | None = None) -> None:
        self.model, self.cfg, self.world = model, cfg, world or World()
        self.parallel = "the whole model in each process, gradients averaged (mx.distributed)"
        net = model.backbone
        model.ops.ranks = self.world.size  # masked means over every rank's count (losses.masked_mean)
        self.rank_keys: list[np.ndarray] = []
        net.grad_checkpoint = cfg.grad_checkpoint
        self.dtype = net.dtype
        self.half = self.dtype in HALF
        # Half-precision compute keeps float32 master weights: at lr 1e-6 a bf16 update would round away.
        self.master: Tree = tree_map(lambda p: p.astype(mx.float32), net.trainable_parameters()) if self.half else {}
        self.optimizer = AdamW(
            cfg.learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=cfg.weight_decay, bias_correction=True
        )
        # Initialised here, not inside the first compiled call: the state tree has the same structure from the
        # first step on (no retrace at step 2), and read_state has something to fill in place.
        self.optimizer.init(self.masters())
        self.lr_dtype = mx.float64 if self.dtype == mx.float64 else mx.float32  # the dtype of the AdamW update
        self.optimizer.learning_rate = mx.array(cfg.learning_rate, self.lr_dtype)
        mx.random.seed(cfg.seed + self.world.rank)  # each rank draws its own thoughts
        mx.eval(self.master, self.optimizer.state)
        self.traces: Counter[str] = Counter()
        """How often each compiled function was traced (a Python side effect runs only while tracing)."""
        state = [net.state, self.optimizer.state, mx.random.state, self.master]
        thinking = [net.state, mx.random.state]
        self._accumulate = mx.compile(self.accumulate_fn, inputs=thinking, outputs=thinking)
        self._step = mx.compile(self.step_fn, inputs=state, outputs=state)
        self._evaluate = mx.compile(self.evaluate_fn, inputs=thinking, outputs=[mx.random.state])

    # ---- traced functions (run in Python only while mx.compile traces them) ----

    def masters(self) -> Tree:
        return self.master if self.half else self.model.backbone.trainable_parameters()

    def terms(self, ids: mx.array, valid: mx.array, thoughts: mx.array | None = None) -> LossTerms:
        """Thoughts (unless given) are drawn with the global mx.random state (DeviceNoise), i.e. the compiled
        function's random input."""
        m = self.model
        return m.thinker().loss(ids, valid, m.layout(ids.shape[1]), thoughts, DeviceNoise(), m.step_mode)

    def gradients(self, ids: mx.array, valid: mx.array, acc: Tree | None, count: int) -> tuple[Metrics, Tree]:
        """Metrics of one micro-batch and acc + d(total / count)/d params, `count` micro-batches in the step (torch:
        (total / count).backward() adds to .grad)."""
        net = self.model.backbone
        params = net.trainable_parameters()

        def loss(p: Tree) -> tuple[mx.array, Metrics]:
            net.update(p)
            terms = self.terms(ids, valid)
            return terms.total / count, scalars(terms)

        (_, metrics), grads = mx.value_and_grad(loss)(params)
        net.update(params)  # value_and_grad leaves its traced copies in the model
        if acc is not None:
            grads = tree_map(mx.add, acc, grads)
        return metrics, grads

    def accumulate_fn(self, ids: mx.array, valid: mx.array, acc: Tree | None, count: int) -> tuple[Metrics, Tree]:
        self.traces["accumulate"] += 1
        return self.gradients(ids, valid, acc, count)

    def step_fn(
        self, ids: mx.array, valid: mx.array, acc: Tree | None, count: int, finite: mx.array
    ) -> tuple[Metrics, mx.array, mx.array]:
        """The last micro-batch's gradients, then clipping and one AdamW update of the master weights, unless a loss
        (`finite`: those of the earlier micro-batches) or the gradient norm is not finite: then the weights and the
        optimizer state stay as they were (selected in the graph, so one compiled step serves both cases)."""
        self.traces["step"] += 1
        net = self.model.backbone
        metrics, grads = self.gradients(ids, valid, acc, count)
        grads = self.averaged(grads)
        if self.half:
            grads = tree_map(lambda g: g.astype(mx.float32), grads)
        if self.cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        else:
            norm = mx.sqrt(sum((mx.sum(mx.square(g)) for g in flat(grads).values()), mx.array(0.0)))
        ok = finite & mx.isfinite(norm) & mx.isfinite(self.model.ops.all_sum(metrics["loss"]))  # alike on every rank
        old, old_state = self.masters(), flat(self.optimizer.state)
        new = self.scaled_updates(self.optimizer.apply_gradients(grads, old), old)
        new = tree_map(lambda n, o: mx.where(ok, n, o), new, old)
        assign(self.optimizer.state, {k: mx.where(ok, v, old_state[k]) for k, v in flat(self.optimizer.state).items()})
        if self.half:
            assign(self.master, flat(new))
            new = tree_map(lambda m: m.astype(self.dtype), new)
        net.update(new)
        return metrics, norm, mx.logical_not(ok)

    def scaled_updates(self, new: Tree, old: Tree) -> Tree:
        """--head-learning-rate: the mixing head's and the thought vectors' AdamW step (weight decay included) times
        its factor, as torch's parameter groups give; mlx.optimizers has one learning rate."""
        before = flat(old)
        scaled = {
            name: before[name] + (value - before[name]) * scale
            for name, value in flat(new).items()
            if (scale := self.cfg.lr_scale(name)) != 1.0
        }
        assign(new, scaled)
        return new

    def averaged(self, grads: Tree) -> Tree:
        """The mean of every rank's gradients (mlx's average_gradients, inside the compiled step), or grads alone."""
        return grads if self.world.size == 1 else average_gradients(grads)

    def evaluate_fn(self, ids: mx.array, valid: mx.array) -> tuple[Metrics, mx.array, mx.array, mx.array]:
        """The metrics, the NLL without and after the thought of the next token (session.token_sums), the thoughts."""
        self.traces["evaluate"] += 1
        terms = self.terms(ids, valid)
        return scalars(terms), terms.nll_base, terms.nll_talk[0], terms.thoughts

    # ---- the Session protocol ----

    def inputs(self, batch: Batch) -> tuple[mx.array, mx.array]:
        """Device ids and the float padding mask. The mask is passed even without padding (all ones, where the
        fixture path passes None): None would be a second compiled graph, and with all-ones weights every masked
        mean is sum(x) / count, the plain mean up to float rounding."""
        ids, mask = self.model.check_ids(batch.ids, batch.mask)
        ops = self.model.ops
        return ops.asarray(ids), ops.asarray(mask.astype(np.float32))

    def step(self, batches: list[Batch], lr: float) -> dict[str, float]:
        # The learning rate is an array in the optimizer state, an input of the compiled step. The first accumulation
        # gets acc=None, a Python constant like `count`: G = 1 traces `step` once, G = 2 adds one `accumulate`
        # trace, G >= 3 two (None and a gradient tree), all reused by every later step.
        self.optimizer.learning_rate = mx.array(lr, self.lr_dtype)
        records, acc, count = [], None, len(batches)
        for batch in batches[:-1]:
            metrics, acc = self._accumulate(*self.inputs(batch), acc, count)
            mx.eval(metrics, acc, random_state())  # one micro-batch at a time in memory
            records.append(metrics)
        earlier = self.world.mean({"loss": sum(float(r["loss"]) for r in records)})["loss"]  # alike on every rank
        finite = mx.array(math.isfinite(earlier))
        metrics, norm, skipped = self._step(*self.inputs(batches[-1]), acc, count, finite)
        mx.eval(metrics, norm, skipped, self.model.backbone.state, self.optimizer.state, self.master, random_state())
        records.append(metrics)
        means = self.world.mean(mean_metrics([{k: float(v) for k, v in r.items()} for r in records]))
        return {**means, "grad_norm": float(norm), "skipped": float(skipped)}

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        training_key = random_key()
        mx.random.seed(seed)
        try:
            yield
        finally:
            set_random_key(training_key)

    def score(self, batch: Batch) -> Scored:
        metrics, nll_base, nll_talk, thoughts = self._evaluate(*self.inputs(batch))
        mx.eval(metrics, nll_base, nll_talk, thoughts)
        base, talk = (np.array(x.astype(mx.float32)) for x in (nll_base, nll_talk))
        return Scored({k: float(v) for k, v in metrics.items()}, base, talk, np.array(thoughts).astype(np.int64))

    @contextmanager
    def gathered(self) -> Iterator[None]:
        if self.world.size > 1:
            self.rank_keys = self.world.gather(random_key())
        yield

    def write_state(self, directory: Path) -> None:
        tensors = {f"optimizer.{k}": v for k, v in flat(self.optimizer.state).items()}
        tensors.update({f"master.{k}": v for k, v in flat(self.master).items()})
        tensors["random.key"] = mx.array(random_key())
        if self.rank_keys:
            tensors["random.ranks"] = mx.array(np.stack(self.rank_keys))
        self.model.write_tensors(tensors, directory / STATE_FILE)  # float64 optimizer state goes through numpy
        meta = {"format": FORMAT, "dtype": self.model.dtype, "master": self.half}
        (directory / META_FILE).write_text(json.dumps(meta))

    def read_state(self, directory: Path) -> None:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("dtype") != self.model.dtype:
            raise ValueError(
                f"{directory}: training state of dtype {meta.get('dtype')} (format {meta.get('format')}), "
                f"this run computes in {self.model.dtype}: resume with the same --dtype"
            )
        saved = read_safetensors(directory / STATE_FILE)
        groups: dict[str, dict[str, mx.array]] = {"optimizer": {}, "master": {}, "random": {}}
        for key, value in saved.items():
            group, _, name = key.partition(".")
            if group not in groups:
                raise ValueError(f"{directory}: unexpected entry {key} in {STATE_FILE}")
            groups[group][name] = value
        if "key" not in groups["random"]:
            raise ValueError(f"{directory}: {STATE_FILE} holds no random key")
        keys = np.array(groups["random"].get("ranks", groups["random"]["key"][None]))  # (ranks, 2)
        check_ranks(directory, len(keys), self.world, "mlx.launch -n")
        for group, tree in (("optimizer", self.optimizer.state), ("master", self.master)):
            current = flat(tree)
            if set(current) != set(groups[group]):
                raise ValueError(f"{directory}: the saved {group} state does not match this model")
            for name, value in groups[group].items():
                if value.size == 1 and current[name].ndim == 0:  # the numpy (float64) route reads scalars as (1,)
                    value = groups[group][name] = value.reshape(())
                if value.shape != current[name].shape or value.dtype != current[name].dtype:
                    raise ValueError(
                        f"{directory}: saved {group} entry {name} has {value.dtype} {value.shape}, "
                        f"expected {current[name].dtype} {current[name].shape}"
                    )
            assign(tree, groups[group])
        if self.half:  # the saved half weights are the rounded masters already; copy to be exact either way
            self.model.backbone.update(tree_map(lambda m: m.astype(self.dtype), self.master))
        set_random_key(keys[self.world.rank])
        mx.eval(self.optimizer.state, self.master, self.model.backbone.state)

    def peak_memory(self) -> float:
        return self.model.ops.peak_memory_gb()
