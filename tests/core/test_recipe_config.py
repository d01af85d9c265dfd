from __future__ import annotations

import json

import pytest

from qstar.core.model_config import inverse_frequencies, parse_config
from qstar.core.recipe import PRESETS, Recipe, make_recipe


def test_paper_preset_is_the_authors_training_script():
    r = make_recipe("paper")
    assert (r.thought_tokens, r.lookahead, r.thoughts_per_position) == (
        9,
        4,
        2,
    )  # n_ahead=12, n_ahead_talk=4, n_passes=2
    assert (r.policy_temperature, r.policy_weight, r.base_loss_weight, r.embedding_scale) == (3.0, 1e6, 0.5, 100.0)
    assert r.mixing == "hidden" and r.clamp_negative_advantage and r.init_token == "---"


@pytest.mark.parametrize(
    "bad",
    [
        dict(lookahead=0),
        dict(thought_tokens=0),
        dict(mixing="gate"),
        dict(base_loss_weight=1.5),
        dict(policy_temperature=0),
        dict(think_every=0),
    ],
)
def test_nonsense_is_rejected(bad):
    with pytest.raises(ValueError, match="invalid recipe"):
        Recipe(**bad)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown recipe preset"):
        make_recipe("fast")
    with pytest.raises(ValueError, match="unknown recipe field"):
        make_recipe("paper", n_ahead=3)
    assert set(PRESETS) == {"paper", "default", "toy", "bridge"}


def test_auto_recipe_is_the_toy_one_for_the_shipped_model_only():
    from qstar.core.train_config import DEFAULT_MODEL, TrainConfig

    assert TrainConfig().make_recipe() == make_recipe("toy")
    assert TrainConfig(model="someone/else").make_recipe() == make_recipe("default")
    assert TrainConfig(model=DEFAULT_MODEL, recipe="paper").make_recipe() == make_recipe("paper")
    assert TrainConfig(recipe_overrides={"lookahead": 3}).make_recipe().lookahead == 3


def test_auto_starts_from_the_recipe_a_checkpoint_records():
    """The shipped model records none: `qstar train` with no flags resolves to toy, as before; a checkpoint's own
    recipe is the base of auto, and the flags change it."""
    from qstar.core.loading import saved_recipe
    from qstar.core.train_config import DEFAULT_MODEL, TrainConfig

    assert saved_recipe(DEFAULT_MODEL) is None
    shipped = TrainConfig().with_model_recipe(None)
    assert shipped.recipe == "toy" and shipped.make_recipe() == make_recipe("toy")
    own = make_recipe("default", thought_tokens=12).to_dict()
    cfg = TrainConfig(model="ckpt", recipe_overrides={"lookahead": 2}).with_model_recipe(own)
    assert cfg.recipe == "checkpoint" and cfg.make_recipe() == make_recipe(own, lookahead=2)
    assert TrainConfig(**cfg.to_dict()).make_recipe() == cfg.make_recipe()  # config.json resumes the same recipe
    named = TrainConfig(model="ckpt", recipe="paper").with_model_recipe(own)
    assert named.make_recipe() == make_recipe("paper") and named.model_recipe == own


def base_config(**extra):
    return {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        **extra,
    }


def test_rope_theta_read_from_both_places():
    old = parse_config(base_config(rope_theta=500000.0))
    new = parse_config(base_config(rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}))
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.num_kv_heads == 2 and old.head_dim == 4


def test_llama3_scaling_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    raw = base_config(hidden_size=256, num_attention_heads=2, rope_parameters=scaling, max_position_embeddings=512)
    ours = inverse_frequencies(parse_config(json.loads(json.dumps(raw))))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw), torch.device("cpu"))
    assert abs(ours - theirs.numpy()).max() <= 1e-6 * abs(theirs.numpy()).max()


def test_unsupported_types_are_rejected():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        parse_config(base_config(model_type="gpt2"))
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        parse_config(base_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
