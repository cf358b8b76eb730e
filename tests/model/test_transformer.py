"""The dense Transformer against a NumPy float64 reference, plus structural properties."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import get_preset
from jaxlm.model.layers import Embed
from jaxlm.model.transformer import Transformer
from tests.numpy_reference import forward as numpy_forward
from tests.random_params import random_params

GPT2 = dataclasses.replace(get_preset("tiny"), max_seq_len=32, scan_layers=False)
LLAMA = dataclasses.replace(get_preset("tiny-llama"), max_seq_len=32, scan_layers=False)

VARIANTS = {
    "gpt2": GPT2,
    "llama_gqa": LLAMA,
    # MQA with QK-norm, both soft-caps, a sliding window, GeGLU and llama3 RoPE scaling whose
    # original length (16) puts the head's frequencies in all three scaling bands.
    "mqa_qknorm_softcap_window_llama3rope": dataclasses.replace(
        LLAMA,
        num_kv_heads=1,
        qk_norm=True,
        attn_logit_softcap=5.0,
        final_logit_softcap=3.0,
        sliding_window=5,
        activation="geglu",
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_len=16,
    ),
    # Sinusoidal positions, exact GELU, LayerNorm without bias, no attention bias, untied output,
    # head_dim (24) not equal to d_model / heads.
    "sinusoidal_gelu_explicit_head_dim": dataclasses.replace(
        GPT2,
        position="sinusoidal",
        activation="gelu",
        norm_bias=False,
        attn_bias=False,
        tie_embeddings=False,
        head_dim=24,
    ),
    "relu_linear_rope": dataclasses.replace(
        LLAMA, activation="relu", rope_scaling="linear", rope_scaling_factor=2.0, mlp_bias=True
    ),
    "no_positions": dataclasses.replace(GPT2, position="none"),
    # Encoders: bidirectional attention within each segment (padding still sees only padding).
    "bidirectional_gpt2": dataclasses.replace(GPT2, causal=False),
    "bidirectional_gqa_window": dataclasses.replace(LLAMA, causal=False, sliding_window=3),
    # BERT: post-LN blocks, a norm on the embeddings, token types, the masked-LM head (tied).
    "bert_post_ln_mlm": dataclasses.replace(
        GPT2,
        causal=False,
        norm_position="post",
        embed_norm=True,
        type_vocab_size=2,
        head="mlm",
        activation="gelu",
    ),
    # muP at 4x its base width (attention 1/h-scaled, logits x 1/4), tied and untied.
    "mup_gpt2": dataclasses.replace(GPT2, parametrization="mup", mup_base_width=16),
    "mup_llama_untied": dataclasses.replace(LLAMA, parametrization="mup", mup_base_width=16),
    # ... widened by adding heads of a fixed size: SP's attention scale, logits x 1/4.
    "mup_more_heads": dataclasses.replace(
        GPT2, parametrization="mup", mup_base_width=16, mup_base_head_dim=GPT2.head_dim
    ),
    # A pre-LN encoder with an untied masked-LM head and RMSNorm.
    "pre_ln_mlm_untied": dataclasses.replace(
        LLAMA, causal=False, head="mlm", activation="relu", tie_embeddings=False, embed_norm=True
    ),
}

B, T = 2, 12


def _tokens(vocab, seed=0, shape=(B, T)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _params(cfg, seed=0):
    return random_params(cfg, seed)


def _logits(cfg, params, tokens, **kw):
    return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, **kw)[0])(params, tokens)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_numpy_float64_reference(name):
    cfg = VARIANTS[name]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    # Row 0: one sequence. Row 1: two packed sequences then padding (segment 0).
    segments = jnp.asarray([[1] * T, [1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    got = _logits(cfg, params, tokens, segment_ids_BT=segments)
    want = numpy_forward(params, tokens, cfg, segment_ids_BT=np.asarray(segments))
    assert np.abs(want).max() > 0.5, "reference logits are too small to test anything"
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_explicit_positions_match_reference():
    cfg = LLAMA
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    positions = jnp.asarray(np.random.default_rng(1).integers(0, 30, (B, T)), jnp.int32)
    got = _logits(cfg, params, tokens, positions_BT=positions)
    want = numpy_forward(params, tokens, cfg, positions_BT=np.asarray(positions))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _influence(cfg, params, tokens_1T, **kw):
    """[T, T]: |d (random readout of logits[t]) / d (token embedding at s)|, summed over D; zero
    exactly where output t does not depend on token s."""

    def readout(delta_TD):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, Embed) and context.method_name == "__call__":
                out = out + delta_TD[None]
            return out

        with nn.intercept_methods(add_delta):
            logits_TV = Transformer(cfg).apply({"params": params}, tokens_1T, **kw)[0][0]
        return logits_TV @ readout_V  # a random readout: zero only where logits[t] do not move

    readout_V = jax.random.normal(jax.random.key(1), (cfg.vocab_size,))
    t = tokens_1T.shape[1]
    return np.abs(np.asarray(jax.jacrev(readout)(jnp.zeros((t, cfg.d_model))))).sum(axis=-1)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_causality_by_gradient(name):
    """d logits[t] / d (token embedding at s) is exactly zero for every s > t."""
    cfg = VARIANTS[name]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size, shape=(1, T))
    influence_TS = _influence(cfg, params, tokens)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(influence_TS[future] == 0.0)
    assert np.all(influence_TS[~future] > 0.0)


@pytest.mark.parametrize("name", ["bidirectional_gpt2", "bidirectional_gqa_window"])
def test_bidirectional_influence_is_exactly_the_segment(name):
    """In a packed row of a bidirectional model, d output[t] / d (embedding at s) is nonzero
    exactly when s and t share a segment (after and before t alike): zero across segments."""
    cfg = VARIANTS[name]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size, shape=(1, T))
    segments = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
    influence_TS = _influence(cfg, params, tokens, segment_ids_BT=segments)
    seg = np.asarray(segments[0])
    same = seg[:, None] == seg[None, :]
    assert np.all(influence_TS[~same] == 0.0)
    # Every layer widens the reach by window - 1 positions each way (two layers here).
    reach = T if cfg.sliding_window is None else cfg.num_layers * (cfg.sliding_window - 1)
    near = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) <= reach
    assert np.all(influence_TS[same & near] > 0.0)
    assert np.all(influence_TS[same & ~near] == 0.0)
    assert np.any(np.triu(influence_TS, k=1) > 0), "no token sees the ones after it"


def test_sliding_window_limits_influence():
    window = 4
    cfg = dataclasses.replace(LLAMA, num_layers=1, sliding_window=window)
    params, tokens = _params(cfg), _tokens(cfg.vocab_size, shape=(1, T))
    s = 3
    changed = tokens.at[0, s].set((tokens[0, s] + 1) % cfg.vocab_size)
    a, b = _logits(cfg, params, tokens), _logits(cfg, params, changed)
    differs = np.abs(np.asarray(a - b)).max(axis=-1)[0] > 0
    np.testing.assert_array_equal(differs, [s <= t < s + window for t in range(T)])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_packed_segment_equals_unpacked(name):
    cfg = VARIANTS[name]
    params = _params(cfg)
    first, second = _tokens(cfg.vocab_size, 1, (1, 5)), _tokens(cfg.vocab_size, 2, (1, 7))
    packed = jnp.concatenate([first, second], axis=1)
    segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    got = _logits(cfg, params, packed, segment_ids_BT=segments)[:, 5:]
    want = _logits(cfg, params, second)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Padding after a sequence changes none of its logits.
    padded = jnp.concatenate([second, jnp.zeros((1, 3), jnp.int32)], axis=1)
    pad_segments = jnp.asarray([[1] * 7 + [0] * 3], jnp.int32)
    got = _logits(cfg, params, padded, segment_ids_BT=pad_segments)[:, :7]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_kv_heads_equal_mha_with_repeated_kv_weights(kv_heads):
    """GQA/MQA equals MHA whose kv projections repeat each kv head for its query group."""
    gqa = dataclasses.replace(LLAMA, num_kv_heads=kv_heads, attn_bias=True)
    mha = dataclasses.replace(gqa, num_kv_heads=gqa.num_heads)
    params, tokens = _params(gqa), _tokens(gqa.vocab_size)
    groups = gqa.num_heads // kv_heads

    def repeat_kv(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if "key" in keys or "value" in keys:
            return jnp.repeat(x, groups, axis=-2)  # [..., K, H] -> [..., N, H]
        return x

    mha_params = jax.tree_util.tree_map_with_path(repeat_kv, params)
    np.testing.assert_allclose(
        _logits(gqa, params, tokens), _logits(mha, mha_params, tokens), atol=1e-5, rtol=0
    )


def _stack_layers(params, num_layers):
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


# scan_unroll=1: XLA's while loop over the layers (as on TPU); None: on CPU, unrolled in the scan.
@pytest.mark.parametrize("unroll", [1, None])
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_scan_equals_unrolled(name, unroll):
    unrolled = VARIANTS[name]
    scanned = dataclasses.replace(unrolled, scan_layers=True, scan_unroll=unroll)
    params, tokens = _params(unrolled), _tokens(unrolled.vocab_size)
    stacked = _stack_layers(dict(params), unrolled.num_layers)
    assert jax.tree.structure(stacked) == jax.tree.structure(random_params(scanned))
    np.testing.assert_allclose(
        _logits(unrolled, params, tokens), _logits(scanned, stacked, tokens), atol=1e-5, rtol=0
    )


@functools.cache
def _loss_and_grad(cfg):
    params, tokens = _params(dataclasses.replace(cfg, remat="none")), _tokens(cfg.vocab_size)

    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens)[0]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(T)[None])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch", "save_qkv_proj"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_equals_no_remat(policy, scan):
    base = dataclasses.replace(LLAMA, scan_layers=scan, scan_unroll=1)  # the rolled loop
    want_loss, want_grad = _loss_and_grad(base)
    got_loss, got_grad = _loss_and_grad(dataclasses.replace(base, remat=policy))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(
        lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5), got_grad, want_grad
    )
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(want_grad))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_tracks_the_float64_reference(param_dtype):
    cfg = dataclasses.replace(LLAMA, dtype="bfloat16", param_dtype=param_dtype)
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(params))
    got = _logits(cfg, params, tokens)
    assert got.dtype == jnp.bfloat16
    want = numpy_forward(params, tokens, cfg)
    # bf16 keeps 8 bits of mantissa: errors of a few percent of the logit scale are expected.
    err = np.abs(np.asarray(got, np.float32) - want)
    assert err.max() < 0.05 * np.abs(want).max(), (err.max(), np.abs(want).max())


def test_longer_than_max_seq_len_is_refused():
    cfg = GPT2
    params = _params(cfg)
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_seq_len=32"):
        Transformer(cfg).apply({"params": params}, jnp.zeros((1, 33), jnp.int32))


@pytest.mark.parametrize(("attn_bias", "out_bias"), [(True, False), (False, True)])
def test_attention_output_bias_separate_from_qkv_biases(attn_bias, out_bias):
    """attn_out_bias decouples the output projection's bias (Qwen2: q/k/v biases only); the
    model equals one with every bias where the biases it lacks are zero."""
    cfg = dataclasses.replace(LLAMA, attn_bias=attn_bias, attn_out_bias=out_bias)
    full = dataclasses.replace(LLAMA, attn_bias=True)
    full_params = _params(full)
    params = jax.tree.map(lambda x: x, full_params)
    for i in range(cfg.num_layers):
        for name in ("query", "key", "value", "out"):
            keep = out_bias if name == "out" else attn_bias
            if not keep:
                b = full_params[f"layers_{i}"]["attn"][name]["b"]
                full_params[f"layers_{i}"]["attn"][name]["b"] = jnp.zeros_like(b)
                del params[f"layers_{i}"]["attn"][name]["b"]
    assert jax.tree.structure(params) == jax.tree.structure(_params(cfg))
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_allclose(
        _logits(cfg, params, tokens), _logits(full, full_params, tokens), atol=1e-6, rtol=0
    )


def test_attention_output_bias_follows_attn_bias_by_default():
    for attn_bias in (True, False):
        cfg = dataclasses.replace(LLAMA, attn_bias=attn_bias)
        assert cfg.attn_out_bias is None and cfg.use_attn_out_bias == attn_bias
        assert ("b" in _params(cfg)["layers_0"]["attn"]["out"]) == attn_bias


def test_a_bidirectional_model_refuses_cached_decoding_sampling_and_decoder_export():
    from jaxlm.interop.hf_families import export_family
    from jaxlm.model.kv_cache import init_cache
    from jaxlm.sample import generate

    cfg = VARIANTS["bidirectional_gpt2"]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    with pytest.raises(ValueError, match=r"model.causal=False\) cannot decode with a KV cache"):
        Transformer(cfg).apply({"params": params}, tokens, cache=init_cache(cfg, B, T))
    with pytest.raises(ValueError, match=r"model\.causal=False: a bidirectional model"):
        generate(cfg, params, [[1, 2, 3]], 4)
    with pytest.raises(ValueError, match=r"causal=False \(needs \(True,\)\)"):
        export_family(cfg, "gpt2")
    export_family(GPT2, "gpt2")  # the same model, causal, is GPT-2


def test_token_types_match_reference_and_change_the_output():
    cfg = VARIANTS["bert_post_ln_mlm"]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    types = jnp.asarray(np.random.default_rng(2).integers(0, 2, (B, T)), jnp.int32)
    got = _logits(cfg, params, tokens, token_types_BT=types)
    want = numpy_forward(params, tokens, cfg, token_types_BT=np.asarray(types))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(got) - np.asarray(_logits(cfg, params, tokens))).max() > 1e-2
    with pytest.raises(ValueError, match="no token-type embeddings"):
        Transformer(GPT2).init(jax.random.key(0), tokens, token_types_BT=types)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_count_is_the_number_of_parameters(name):
    from jaxlm.metrics import param_count
    from jaxlm.model.transformer import abstract_params

    cfg = VARIANTS[name]
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
    assert param_count(cfg).total == sum(x.size for x in leaves)


PREFIX_LMS = {
    "gpt2": dataclasses.replace(GPT2, prefix_lm=True),
    "llama_gqa_window_prompt_tuned": dataclasses.replace(
        LLAMA, prefix_lm=True, sliding_window=4, prompt_tokens=2
    ),
}


@pytest.mark.parametrize("name", list(PREFIX_LMS))
def test_prefix_lm_matches_the_reference_and_sees_only_its_prefix_ahead(name):
    """Logits of packed rows with a prefix in each segment equal the NumPy reference (prefix
    tokens see the whole prefix, the rest attends causally); by gradient, a prefix token is
    influenced by the later prefix tokens of its segment and by nothing after the prefix."""
    cfg = PREFIX_LMS[name]
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    segments = jnp.asarray([[1] * T, [1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    prefix = np.zeros((B, T), bool)
    prefix[0, :7] = True
    prefix[1, :3] = prefix[1, 5:7] = True
    got = _logits(cfg, params, tokens, segment_ids_BT=segments, prefix_BT=jnp.asarray(prefix))
    if cfg.prompt_tokens:  # the reference has no prompt tuning: compare the structure only
        assert got.shape == (B, T, cfg.vocab_size)
    else:
        want = numpy_forward(params, tokens, cfg, np.asarray(segments), prefix_BT=prefix)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    causal = _logits(cfg, params, tokens, segment_ids_BT=segments)
    assert np.abs(np.asarray(got[0, :6]) - np.asarray(causal[0, :6])).max() > 1e-3
    # Exactly zero where a token is neither before the query nor in the query's prefix (the
    # prefix is a block at the start, so this holds through every layer, windowed or not).
    influence = _influence(cfg, params, tokens[:1], prefix_BT=jnp.asarray(prefix[:1]))
    q, k = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    seen = (k <= q) | (prefix[0][:, None] & prefix[0][None, :])
    assert np.all(influence[~seen] == 0.0)
    if cfg.sliding_window is None:
        assert np.all(influence[seen] > 0.0)


def test_a_prefix_needs_a_prefix_lm_and_a_prefix_lm_a_causal_model():
    with pytest.raises(ValueError, match="not a prefix LM"):
        Transformer(GPT2).init(jax.random.key(0), _tokens(10), prefix_BT=jnp.ones((B, T), bool))
    with pytest.raises(ValueError, match="prefix_lm=True needs causal=True"):
        dataclasses.replace(GPT2, causal=False, prefix_lm=True)


def test_dropout_is_noise_while_training_and_nothing_in_evaluation():
    """model.dropout changes nothing without a "dropout" rng; with one, outputs change (the
    same rng the same way), and at rate p about a fraction p of an MLP's outputs are zeroed."""
    cfg = dataclasses.replace(GPT2, dropout=0.3)
    params, tokens = _params(cfg), _tokens(cfg.vocab_size)
    plain = _logits(GPT2, params, tokens)
    np.testing.assert_array_equal(_logits(cfg, params, tokens), plain)

    def noisy(key):
        fn = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, rngs={"dropout": key}))
        return np.asarray(fn(params, tokens)[0])

    a, b = noisy(jax.random.key(1)), noisy(jax.random.key(2))
    assert np.abs(a - plain).max() > 1e-2 and np.abs(a - b).max() > 1e-2
    np.testing.assert_array_equal(a, noisy(jax.random.key(1)))

    from jaxlm.model.transformer import residual_dropout

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x):
            return residual_dropout(self, cfg, x)

    x = jnp.ones((64, 64))
    y = np.asarray(Probe().apply({}, x, rngs={"dropout": jax.random.key(0)}))
    assert abs((y == 0).mean() - 0.3) < 0.03
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
