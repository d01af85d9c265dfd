"""Every knob of Quiet-STaR in one validated dataclass, plus named presets.

The "paper" preset reproduces the authors' released training code (ezelikman/quiet-star,
`quiet-star-train.py` + `modeling_mistral.py`); `README.md` documents each value and every
place where the "default" preset deviates from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from qstar.core.fields import check_fields

MIXING_MODES = ("hidden", "logits-sigmoid")


@dataclass(frozen=True)
class Recipe:
    thought_tokens: int = 8
    """Sampled tokens per thought, excluding <start> and <end> (authors: n_ahead - 3)."""
    lookahead: int = 4
    """True future tokens scored after each thought (authors: n_ahead_talk)."""
    thoughts_per_position: int = 2
    """Thoughts sampled per position; they form the REINFORCE baseline group (authors: n_passes)."""
    sample_temperature: float = 1.0
    """Temperature of the thought-token draw (0 = greedy)."""
    policy_temperature: float = 3.0
    """Temperature of the log-probabilities in the policy loss (authors: reinforce_temperature)."""
    policy_weight: float = 1.0
    """Factor on the REINFORCE loss (authors: policy_loss_beta)."""
    base_loss_weight: float = 0.5
    """Weight of the no-thought NLL in the LM loss; the lookahead terms share the rest equally."""
    mixing: str = "hidden"
    """"hidden": unbounded weight w, h = (1 - w) h_base + w h_thought (authors);
    "logits-sigmoid": w = sigmoid(head output), same interpolation (seed implementation)."""
    clamp_negative_advantage: bool = True
    """Zero the advantages below the group baseline (authors: remove_negative_rewards)."""
    embedding_scale: float = 100.0
    """The <start>/<end> input vectors are `embedding_scale * parameter`, which amplifies their gradient."""
    init_token: str = "---"
    """Text whose token embedding initialises <start> and <end>."""
    think_every: int = 1
    """Positions i with i % think_every == 0 think (1 = every position)."""
    entropy_bonus: float = 0.0
    """Factor on the policy's mean entropy per thought token (at policy_temperature), subtracted from the loss: a
    guard against thoughts collapsing to one string (0 = none, the authors')."""

    def __post_init__(self) -> None:
        check_fields(self)
        checks = [
            (self.thought_tokens >= 1, "thought_tokens must be >= 1"),
            (self.lookahead >= 1, "lookahead must be >= 1"),
            (self.thoughts_per_position >= 1, "thoughts_per_position must be >= 1"),
            (self.sample_temperature >= 0, "sample_temperature must be >= 0 (0 = greedy)"),
            (self.policy_temperature > 0, "policy_temperature must be > 0"),
            (self.policy_weight >= 0, "policy_weight must be >= 0"),
            (0 <= self.base_loss_weight <= 1, "base_loss_weight must lie in [0, 1]"),
            (self.mixing in MIXING_MODES, f"mixing must be one of {MIXING_MODES}"),
            (self.embedding_scale > 0, "embedding_scale must be > 0"),
            (bool(self.init_token), "init_token must be a non-empty string"),
            (self.think_every >= 1, "think_every must be >= 1"),
            (self.entropy_bonus >= 0, "entropy_bonus must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid recipe: {message}")

    @property
    def thought_steps(self) -> int:
        """Decoder steps after the base token: <start>, k thought tokens, <end>, lookahead - 1 true tokens."""
        return self.thought_tokens + self.lookahead + 1

    def min_seq_len(self) -> int:
        """Shortest sequence that leaves one rewarded position."""
        return self.lookahead + 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        thought_tokens=9,
        lookahead=4,
        thoughts_per_position=2,
        sample_temperature=1.0,
        policy_temperature=3.0,
        policy_weight=1e6,
        base_loss_weight=0.5,
        mixing="hidden",
        clamp_negative_advantage=True,
        embedding_scale=100.0,
        init_token="---",
        think_every=1,
        entropy_bonus=0.0,
    ),
    "default": {},
    # The shipped toy model (weights/arith-llama, qstar/core/synthetic.py); docs/TOY.md measures what each value
    # that differs from "default" brings (each set back to its default in a run of its own).
    "toy": dict(
        thought_tokens=4,  # the width of a worked document's field: a thought ends where the field does
        lookahead=2,  # the answer and the `.` after it
        embedding_scale=1.0,  # <start>/<end> start as `|` and train at the same speed as every other weight
        init_token="|",  # a thought opens (and closes) like the field of a worked document
    ),
    # The bridge world (qstar/core/bridge.py) on a real model's BPE vocabulary; docs/REAL.md measures it.
    "bridge": dict(
        thought_tokens=5,  # a worked field's values and commas (` three, four, eight`): the thought ends where it does
        lookahead=2,  # the answer word and the `.` after it
        embedding_scale=1.0,  # <start>/<end> start as ` —` and train at the speed of every other weight
        init_token=" —",  # a thought opens (and closes) like the field of a worked document
    ),
}


def make_recipe(preset: str | Recipe | dict[str, Any] | None = "default", **overrides: Any) -> Recipe:
    """Build a recipe from a preset name (or a saved dict) plus field overrides; unknown names are errors."""
    if isinstance(preset, Recipe):
        base: dict[str, Any] = preset.to_dict()
    elif isinstance(preset, dict):
        base = dict(preset)
    else:
        name = preset or "default"
        if name not in PRESETS:
            raise ValueError(f"unknown recipe preset {name!r}; choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[name])
    known = {f.name for f in fields(Recipe)}
    unknown = sorted((set(base) | set(overrides)) - known)
    if unknown:
        raise ValueError(f"unknown recipe field(s) {unknown}; valid fields: {sorted(known)}")
    return replace(Recipe(**base), **overrides)
