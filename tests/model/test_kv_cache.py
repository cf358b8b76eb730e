"""Prefill + cached decoding against the full forward pass on the whole sequence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import MoEConfig
from jaxlm.model.kv_cache import init_cache
from jaxlm.model.transformer import Transformer
from jaxlm.sample import decode_step, prefill
from tests.model.test_transformer import GPT2, LLAMA, VARIANTS
from tests.random_params import random_params

CASES = {
    "mha_learned_gpt2": GPT2,
    "gqa_rope_llama": LLAMA,
    "mqa_window_softcaps": VARIANTS["mqa_qknorm_softcap_window_llama3rope"],
    "sinusoidal": VARIANTS["sinusoidal_gelu_explicit_head_dim"],
    "gqa_rope_scanned": dataclasses.replace(LLAMA, scan_layers=True, scan_unroll=1),
    "mha_learned_scanned": dataclasses.replace(GPT2, scan_layers=True),
    # Dropless MoE routes each token on its own, so cached decoding matches exactly.
    "moe_every_2nd_scanned": dataclasses.replace(
        LLAMA,
        scan_layers=True,
        num_layers=4,
        moe=MoEConfig(num_experts=4, top_k=2, every=2, num_shared_experts=1),
    ),
    "moe_unrolled": dataclasses.replace(LLAMA, moe=MoEConfig(num_experts=4, top_k=1)),
}

B, T, PROMPT = 2, 14, 5


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_decode_equals_the_full_forward_at_every_step(name):
    cfg = CASES[name]
    params = random_params(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    full = np.asarray(Transformer(cfg).apply({"params": params}, tokens)[0])

    run = jax.jit(
        lambda p, t, n, c: prefill(cfg, p, t, n, c),
    )
    step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c))
    cache = init_cache(cfg, B, 20)
    logits, cache = run(params, tokens[:, :PROMPT], jnp.full((B,), PROMPT), cache)
    np.testing.assert_allclose(logits, full[:, PROMPT - 1], atol=1e-5, rtol=1e-5)
    for i in range(PROMPT, T):
        logits, cache = step(params, tokens[:, i], cache)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-5, rtol=1e-5, err_msg=f"pos {i}")
    assert cache.lengths.tolist() == [T, T]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_rows_of_different_lengths_each_see_their_own_positions(padding):
    cfg = LLAMA
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 7, 1)]
    t = 8
    padded = np.zeros((3, t), np.int32)
    for i, r in enumerate(rows):
        if padding == "right":
            padded[i, : len(r)] = r
        else:
            padded[i, t - len(r) :] = r
    lengths = jnp.asarray([len(r) for r in rows])
    cache = init_cache(cfg, 3, 16)
    logits, cache = prefill(cfg, params, jnp.asarray(padded), lengths, cache, padding)
    nxt = jnp.asarray([7, 8, 9])
    logits2, _ = decode_step(cfg, params, nxt, cache)
    for i, r in enumerate(rows):  # each row alone, no padding, whole forward
        alone = Transformer(cfg).apply({"params": params}, jnp.asarray([[*r, 7 + i]]))[0]
        np.testing.assert_allclose(logits[i], alone[0, len(r) - 1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logits2[i], alone[0, len(r)], atol=1e-5, rtol=1e-5)


def test_bfloat16_cache_tracks_the_bfloat16_forward():
    cfg = dataclasses.replace(LLAMA, dtype="bfloat16")
    params = random_params(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 10)), jnp.int32)
    full = np.asarray(Transformer(cfg).apply({"params": params}, tokens)[0], np.float32)
    cache = init_cache(cfg, 1, 16)
    assert cache.k.dtype == jnp.bfloat16
    logits, cache = prefill(cfg, params, tokens[:, :4], jnp.asarray([4]), cache)
    got = [logits[0]]
    for i in range(4, 10):
        logits, cache = decode_step(cfg, params, tokens[:, i], cache)
        got.append(logits[0])
    # bf16 rounding differs between one long pass and step-by-step: compare at bf16 precision.
    np.testing.assert_allclose(np.stack(got), full[0, 3:10], atol=0.1, rtol=0.05)
    assert (np.argmax(np.stack(got), -1) == np.argmax(full[0, 3:10], -1)).mean() >= 0.8


def test_cache_length_is_checked():
    with pytest.raises(ValueError, match=r"cache length 40 must be in \[1, model.max_seq_len=32\]"):
        init_cache(LLAMA, 1, 40)


@pytest.mark.parametrize("layout", ["unrolled", "scanned", "scanned_loop"])
def test_a_decode_step_updates_the_cache_in_place(layout):
    """Each layer writes its token into the stacked cache and reads its own layer: the compiled
    step's temporaries stay a fraction of the cache (0.16x unrolled, 0.5x scanned and unrolled
    by XLA, 0.17x as a loop). Slicing layers out and restacking them, as before, needed more
    temporary memory than the whole cache (1.07x, 1.38x, 1.23x)."""
    scan = {"unrolled": {}, "scanned": {"scan_layers": True}}
    scan["scanned_loop"] = {"scan_layers": True, "scan_unroll": 1}
    cfg = dataclasses.replace(LLAMA, num_layers=8, max_seq_len=512, **scan[layout])
    params = jax.eval_shape(lambda: random_params(cfg, seed=0))
    cache = jax.eval_shape(lambda: init_cache(cfg, 4, 512))
    step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c), donate_argnums=2)
    tokens = jax.ShapeDtypeStruct((4,), jnp.int32)
    memory = step.lower(params, tokens, cache).compile().memory_analysis()
    cache_bytes = cache.k.size * cache.k.dtype.itemsize * 2
    assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is the output's
    assert memory.temp_size_in_bytes < 0.6 * cache_bytes, memory.temp_size_in_bytes / cache_bytes


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_a_ring_buffer_of_the_window_decodes_as_the_full_forward(int8):
    """Mistral-style: every layer slides a window of 6; the cache holds 6 slots, decoding runs
    far past the window from prompts shorter and longer than it, rows of different lengths."""
    from jaxlm.model.kv_cache import to_ring

    w, total = 6, 30
    cfg = dataclasses.replace(LLAMA, sliding_window=w, max_seq_len=32)
    if int8:
        cfg = dataclasses.replace(cfg, kv_cache_dtype="int8")
    params = random_params(cfg, seed=5)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, total)))
    full = np.asarray(Transformer(dataclasses.replace(cfg, kv_cache_dtype="auto")).apply(
        {"params": params}, tokens)[0])  # fmt: skip
    lengths = jnp.asarray([3, 9], jnp.int32)  # one shorter than the window, one longer
    cache = init_cache(cfg, 2, 16)
    logits, cache = jax.jit(lambda p, t, n, c: prefill(cfg, p, t, n, c))(
        params, tokens[:, :16], lengths, cache
    )
    ring = to_ring(cache, w)
    assert ring.max_length == w and ring.lengths.tolist() == [3, 9]
    step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c))
    tol = dict(atol=0.05, rtol=0.05) if int8 else dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, full[[0, 1], [2, 8]], **tol)
    pos = np.asarray(lengths)
    for _ in range(total - 9):  # row 1 reaches position 29, 5 windows past its prompt
        logits, ring = step(params, tokens[jnp.arange(2), pos], ring)
        np.testing.assert_allclose(logits, full[[0, 1], pos], **tol, err_msg=f"{pos}")
        pos = pos + 1
    assert ring.max_length == w


def test_a_ring_buffer_takes_one_token_per_decode_call():
    cfg = dataclasses.replace(LLAMA, sliding_window=4, max_seq_len=32)
    params = random_params(cfg, seed=5)
    cache = init_cache(cfg, 1, 4)
    with pytest.raises(ValueError, match=r"ring-buffer cache .* takes one token per call"):
        Transformer(cfg).apply({"params": params}, jnp.zeros((1, 2), jnp.int32), cache=cache)
