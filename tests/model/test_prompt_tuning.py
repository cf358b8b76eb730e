"""Prompt tuning: learned embeddings before every sequence, seen by every packed segment, decoded
through the KV cache exactly as a full forward computes them, and the only thing that trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import get_preset
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan
from jaxlm.sample import generate
from jaxlm.tasks import param_names
from tests.random_params import random_params


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])  # learned positions, RoPE
def model(request):
    cfg = dataclasses.replace(get_preset(request.param), prompt_tokens=3, max_seq_len=64)
    return cfg, random_params(cfg, seed=1)


def test_the_prompt_acts_like_a_prefix_of_embeddings(model):
    cfg, params = model
    tokens = jnp.asarray([[5, 9, 30, 7]])
    logits = Transformer(cfg).apply({"params": params}, tokens)[0]
    # Reference: the same computation with the prompt embeddings written into the embedding
    # table as 3 extra "tokens" in front, on a model without prompt tuning.
    plain = dataclasses.replace(cfg, prompt_tokens=0)
    table = params["embed"]["embedding"]
    extra = {**params, "embed": {"embedding": jnp.concatenate([table, params["prompt_embedding"]])}}
    extra.pop("prompt_embedding")
    if "unembed" in params:  # untied output: 3 unused columns for the extra ids
        w = params["unembed"]["w"]
        extra["unembed"] = {"w": jnp.concatenate([w, jnp.zeros((w.shape[0], 3), w.dtype)], 1)}
    plain = dataclasses.replace(plain, vocab_size=cfg.vocab_size + 3)
    ids = jnp.concatenate([jnp.arange(cfg.vocab_size, cfg.vocab_size + 3)[None], tokens], axis=1)
    want = Transformer(plain).apply({"params": extra}, ids)[0][:, 3:, : cfg.vocab_size]
    np.testing.assert_allclose(logits, want, atol=2e-5, rtol=1e-5)


def test_every_packed_segment_sees_the_prompt(model):
    cfg, params = model
    a, b = [5, 9, 30, 7], [11, 3, 8]
    packed = jnp.asarray([a + b])
    segments = jnp.asarray([[1] * len(a) + [2] * len(b)])
    both = Transformer(cfg).apply({"params": params}, packed, segment_ids_BT=segments)[0]
    alone = Transformer(cfg).apply({"params": params}, jnp.asarray([b]))[0]
    np.testing.assert_allclose(both[:, len(a) :], alone, atol=2e-5, rtol=1e-5)


def test_cached_decoding_equals_a_full_forward_argmax_loop(model):
    cfg, params = model
    prompts = [[1, 5, 9, 30], [1, 7]]
    got = generate(cfg, params, prompts, 6)
    for prompt, out in zip(prompts, got, strict=True):
        ids = list(prompt)
        for _ in range(6):
            logits = Transformer(cfg).apply({"params": params}, jnp.asarray([ids]))[0]
            ids.append(int(jnp.argmax(logits[0, -1])))
        assert out == ids[len(prompt) :]


def test_only_the_prompt_trains():
    cfg = load_config("tiny", ["model.prompt_tokens=4", "data.seq_len=32", "data.batch_size=8"])
    plan = RunPlan(cfg)
    assert plan.trainable_names() == ["prompt_embedding"]
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 3 for i in range(32)]
    it = DataIterator(build_dataset(docs, ByteTokenizer(), seq_len=32, batch_size=8))
    state = plan.init_state()
    start = jax.device_get(state.params)
    for _ in range(2):
        state, _ = plan.train_step(state, to_global(next(it), plan.mesh))
    end = jax.device_get(state.params)
    for name, a, b in zip(
        param_names(start), jax.tree.leaves(start), jax.tree.leaves(end), strict=True
    ):
        assert np.array_equal(a, b) == (name != "prompt_embedding"), name
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * 4 * 64
