"""qstar's lm-evaluation-harness model on a real model: SmolLM2-135M-Instruct converted from its GGUF file, whose
tokenizer adds no BOS (the prefix token of an empty context is its BOS all the same, as HFLM's), answers every kind
of request as the harness's HFLM with its default arguments does (windows of its whole 8,192-token context)."""

from __future__ import annotations

from helpers import assert_harness_like_hflm, require

require("lm_eval")

TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 "
    "clips altogether in April and May. "
) * 3


def test_without_thoughts_smollm2_answers_every_request_as_hflm(smollm2):
    contexts = ["Q: Natalia sold 48 clips in April and half as many in May. How many in May?\nA:", "The capital of"]
    assert_harness_like_hflm(smollm2, TEXT, contexts)
