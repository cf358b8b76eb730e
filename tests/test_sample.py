"""Greedy decoding (no KV cache) against a step-by-step Python reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import get_preset
from jaxlm.model.transformer import Transformer
from jaxlm.sample import greedy_without_cache
from tests.random_params import random_params

CFG = get_preset("tiny-llama")


def test_greedy_matches_rerunning_the_model_on_the_growing_sequence():
    params = random_params(CFG, seed=3)
    prompt = [1, 40, 41, 42]
    want = list(prompt)
    for _ in range(6):  # reference: a fresh forward pass on exactly the tokens so far
        logits = Transformer(CFG).apply({"params": params}, jnp.asarray([want]))[0]
        want.append(int(np.argmax(np.asarray(logits[0, -1]))))
    assert greedy_without_cache(CFG, params, prompt, 6) == want


def test_generation_stops_at_max_seq_len_and_bad_prompts_are_refused():
    params = random_params(CFG, seed=3)
    out = greedy_without_cache(CFG, params, [5] * (CFG.max_seq_len - 2), 10)
    assert len(out) == CFG.max_seq_len
    with pytest.raises(ValueError, match="the prompt is empty"):
        greedy_without_cache(CFG, params, [], 4)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 320\)"):
        greedy_without_cache(CFG, params, [1, 320], 4)
