"""Fused attention (splash in Pallas interpret mode on CPU; cuDNN's call through XLA) against a
naive NumPy / autodiff reference, whole train steps against the XLA path, and the choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.configs import MeshConfig
from jaxlm.configs.model import ModelConfig
from jaxlm.configs.overrides import load_config
from jaxlm.model import fused_attention as fa
from jaxlm.model.transformer import Transformer, param_shardings
from tests.random_params import random_params


def _naive(q_BTNH, k_BTKH, v_BTKH, ids_BT, causal, window, cap, xp=np):
    """softmax(mask(cap(q kᵀ))) v by the definition, in float64 NumPy (or jnp for autodiff)."""
    t, n, kv = q_BTNH.shape[1], q_BTNH.shape[2], k_BTKH.shape[2]
    k_BTNH = xp.repeat(k_BTKH, n // kv, axis=2)
    v_BTNH = xp.repeat(v_BTKH, n // kv, axis=2)
    logits = xp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH)
    if cap is not None:
        logits = cap * xp.tanh(logits / cap)
    i = np.arange(t)
    visible = np.ones((t, t), bool) if not causal else i[:, None] >= i[None, :]
    if window is not None:
        visible &= np.abs(i[:, None] - i[None, :]) < window
    visible = visible[None] & (ids_BT[:, :, None] == ids_BT[:, None, :])
    logits = xp.where(visible[:, None], logits, -1e30)
    probs = xp.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    return xp.einsum("bnts,bsnh->btnh", probs, v_BTNH)


def _qkv(b, t, n, k, h, seed=0):
    rng = np.random.default_rng(seed)
    q, kk, v = (rng.normal(size=(b, t, heads, h)).astype(np.float32) for heads in (n, k, k))
    return q * h**-0.5, kk, v


def _packed(b, t):
    """Two documents then padding (segment 0) in row 0; one document in the others."""
    ids = np.ones((b, t), np.int32)
    ids[0, t // 3 :] = 2
    ids[0, t - 7 :] = 0
    return ids


CASES = {  # name: (ModelConfig overrides, length, packed)
    "causal": (dict(), 256, False),
    "causal_segments_gqa": (dict(num_kv_heads=2), 256, True),
    "window_mqa_softcap": (
        dict(num_kv_heads=1, sliding_window=70, attn_logit_softcap=5.0), 256, True
    ),
    "bidirectional_window": (dict(causal=False, sliding_window=40), 128, True),
    "bidirectional": (dict(causal=False), 128, False),
    "ragged_length_padded": (dict(num_kv_heads=2, sliding_window=50), 200, True),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_splash_forward_and_gradients_equal_the_naive_attention(name):
    overrides, t, packed = CASES[name]
    cfg = ModelConfig(num_heads=4, d_model=128, attention_impl="splash", **overrides)
    q, k, v = _qkv(2, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    ids = _packed(2, t) if packed else np.ones((2, t), np.int32)
    mask = (ids, cfg.causal, cfg.sliding_window, cfg.attn_logit_softcap)
    want = _naive(*(x.astype(np.float64) for x in (q, k, v)), *mask)
    run = jax.jit(lambda q, k, v: fa.splash_attention(q, k, v, ids if packed else None, cfg))
    np.testing.assert_allclose(run(q, k, v), want, atol=2e-5, rtol=0)

    # Gradients of a weighted sum of the outputs, against autodiff of the definition.
    w = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)
    ref = jax.grad(lambda *a: jnp.sum(w * _naive(*a, *mask, xp=jnp)), (0, 1, 2))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(w * run(*a)), (0, 1, 2)))(q, k, v)
    for g, r in zip(got, ref(q, k, v), strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4)
        assert np.abs(r).max() > 0.1


@pytest.mark.parametrize("name", ["causal_segments_gqa", "window_mqa_softcap", "bidirectional"])
def test_cudnn_call_expresses_the_same_attention(name):
    """The arguments given to jax.nn.dot_product_attention (mask types, window, segment mask)
    are checked through its XLA implementation; on a GPU only the implementation changes."""
    overrides, t, packed = CASES[name]
    overrides = {k: v for k, v in overrides.items() if k != "attn_logit_softcap"}
    cfg = ModelConfig(num_heads=4, d_model=128, **overrides)
    q, k, v = _qkv(2, t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    ids = _packed(2, t) if packed else np.ones((2, t), np.int32)
    mask = (ids, cfg.causal, cfg.sliding_window, None)
    want = _naive(*(x.astype(np.float64) for x in (q, k, v)), *mask)
    got = fa.cudnn_attention(q, k, v, ids if packed else None, cfg, implementation="xla")
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _lm_batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    ids = _packed(b, t)
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(ids)


def _loss_and_grads(cfg, params, batch, mesh=None, rules=None):
    tokens, targets, ids = batch

    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens, segment_ids_BT=ids)[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * (ids > 0)) / jnp.sum(ids > 0)

    if mesh is None:
        return jax.jit(jax.value_and_grad(loss))(params)
    with sharding.use_mesh(mesh, rules):
        return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(got, want):
    (lg, gg), (lw, gw) = got, want
    np.testing.assert_allclose(lg, lw, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_train_step_loss_and_gradients_with_splash_equal_xla(scan):
    """A GQA model with RoPE, a window and packed segments, both layer layouts."""
    base = load_config("tiny-llama", ["model.sliding_window=100", "model.max_seq_len=256"]).model
    cfg = dataclasses.replace(base, scan_layers=scan, attention_impl="xla")
    params = random_params(cfg, embed_std=0.1)
    batch = _lm_batch(cfg, 2, 256)
    want = _loss_and_grads(cfg, params, batch)
    got = _loss_and_grads(dataclasses.replace(cfg, attention_impl="splash"), params, batch)
    _assert_close(got, want)


@pytest.mark.parametrize("fsdp, tensor", [(4, 2), (2, 4)])
def test_sharded_splash_step_equals_the_single_device_xla_step(fsdp, tensor):
    """shard_map over batch (fsdp) and heads (tensor); at tensor 4 the 2 kv heads cannot split
    like the 4 query heads, so each query head gets its own copy."""
    cfg = load_config("tiny-llama", ["model.max_seq_len=128"]).model
    cfg = dataclasses.replace(cfg, attention_impl="xla")
    assert cfg.num_kv_heads == 2 and cfg.num_heads == 4
    batch = _lm_batch(cfg, 8, 128)
    single = jax.device_put(random_params(cfg, embed_std=0.1), jax.devices()[0])
    want = _loss_and_grads(cfg, single, jax.device_put(batch, jax.devices()[0]))
    rules = "fsdp_tp"
    mesh = sharding.make_mesh(MeshConfig(fsdp=fsdp, tensor=tensor, rules=rules))
    splash = dataclasses.replace(cfg, attention_impl="splash")
    params = random_params(cfg, shardings=param_shardings(cfg, mesh, rules), embed_std=0.1)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    got = _loss_and_grads(splash, params, jax.device_put(batch, rows), mesh, rules)
    _assert_close(got, want)
    with sharding.use_mesh(mesh, rules):
        forward = jax.make_jaxpr(lambda p, t: Transformer(splash).apply({"params": p}, t)[0])
        text = str(forward(params, batch[0]))
    assert "shard_map" in text and "pallas_call" in text  # the kernel, inside a shard_map


def test_prefill_with_splash_gives_the_xla_prefill_cache_and_tokens():
    from jaxlm.model.kv_cache import init_cache
    from jaxlm.sample import prefill

    cfg = load_config("tiny-llama", ["model.max_seq_len=256"]).model
    params = random_params(cfg, embed_std=0.1)
    tokens, _, _ = _lm_batch(cfg, 2, 150)
    lengths = jnp.asarray([150, 97], jnp.int32)
    out = {}
    for impl in ("xla", "splash"):
        c = dataclasses.replace(cfg, attention_impl=impl)
        cache = init_cache(c, 2, 256)
        out[impl] = jax.jit(prefill, static_argnums=0)(c, params, tokens, lengths, cache)
    (lx, cx), (ls, cs) = out["xla"], out["splash"]
    np.testing.assert_allclose(ls, lx, atol=2e-5, rtol=0)
    np.testing.assert_allclose(cs.k, cx.k, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cs.lengths, cx.lengths)


def test_auto_picks_the_backends_kernel_or_says_why_not():
    cfg = ModelConfig(num_heads=4, d_model=128)
    assert fa.describe(cfg, 256, on="cpu") == ("xla", "auto: no fused kernel on 'cpu'")
    assert fa.describe(cfg, 1024, on="tpu") == ("splash", "auto on tpu, blocks q 512 / kv 512")
    assert fa.describe(cfg, 384, on="tpu")[1] == "auto on tpu, blocks q 128 / kv 128"
    assert fa.describe(cfg, 100, on="tpu") == (
        "xla",
        "auto: sequence length 100 is not a multiple of 128",
    )
    prefix = dataclasses.replace(cfg, prefix_lm=True)
    assert fa.describe(prefix, 256, on="tpu") == (
        "xla",
        "auto: splash cannot express prefix-LM attention (model.prefix_lm=True)",
    )
    assert fa.describe(cfg, 256, on="gpu")[0] == "xla"  # float32: cuDNN needs 16-bit
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert fa.describe(bf16, 256, on="gpu") == ("cudnn", "auto on gpu")
    big_heads = ModelConfig(num_heads=2, d_model=512)  # head_dim 256
    assert fa.block_sizes(big_heads, 2048) == (256, 256)
    tiles = dataclasses.replace(cfg, attention_block_q=256, attention_block_kv=128)
    assert fa.block_sizes(tiles, 1024) == (256, 128)
    # Decode steps and dense-only masks stay on XLA even when the kernel is asked for.
    splash = dataclasses.replace(cfg, attention_impl="splash")
    assert fa.call_impl(splash, 1, self_attention=False, dense_mask=False) == "xla"
    assert fa.call_impl(splash, 256, self_attention=True, dense_mask=True) == "xla"
    assert fa.call_impl(splash, 256, self_attention=True, dense_mask=False) == "splash"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(attention_impl="splash", prefix_lm=True),
            r"attention_impl='splash' cannot express prefix-LM attention",
        ),
        (
            dict(attention_impl="splash", prompt_tokens=4),
            r"cannot express prompt tuning \(model.prompt_tokens=4",
        ),
        (
            dict(attention_impl="cudnn", attn_logit_softcap=30.0, dtype="bfloat16"),
            r"'cudnn' cannot express the attention-logit soft-cap",
        ),
        (dict(attention_impl="cudnn"), r"'cudnn' cannot express float32 compute"),
        (dict(attention_impl="flash"), r"attention_impl='flash' is not valid; choose one of"),
        (dict(attention_block_q=96), r"attention_block_q=96 must be a multiple of 128"),
    ],
)
def test_config_refuses_what_a_kernel_cannot_express(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(num_heads=4, d_model=128, **overrides)


def test_kernel_on_the_wrong_backend_and_tiles_that_do_not_divide_are_refused():
    from jaxlm.run import RunPlan

    cudnn = ModelConfig(attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"'cudnn' needs a GPU, but this runs on 'cpu'"):
        Transformer(cudnn).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"'splash' is a TPU kernel and cannot run on 'gpu'"):
        fa.describe(ModelConfig(attention_impl="splash"), 128, on="gpu")
    config = load_config(
        None, ["model.attention_impl=splash", "model.attention_block_q=256", "data.seq_len=128"]
    )
    with pytest.raises(ValueError, match=r"attention_block_q=256 does not divide the sequence"):
        RunPlan(config, check_data=False)


def test_a_sharded_train_step_with_splash_updates_the_state_as_xla_does():
    """RunPlan's whole train step (loss, grads, clipping, AdamW) on fsdp 4 x tensor 2, packed
    rows and a window: the updated parameters and the metrics equal the XLA path's."""
    from jaxlm.data import to_global
    from jaxlm.data.tokenizer import ByteTokenizer
    from jaxlm.model.attention import segment_positions
    from jaxlm.run import RunPlan

    sets = ["mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp", "model.max_seq_len=128"]
    sets += ["data.seq_len=128", "data.batch_size=8", "model.sliding_window=64"]
    # No warmup (a first step that moves), and eps large enough that AdamW's first update is
    # smooth in the gradient (~ lr * g) instead of lr * sign(g), which float noise could flip.
    sets += ["optim.warmup_steps=0", "optim.eps=1.0", "optim.weight_decay=0"]
    tokens, targets, ids = _lm_batch(load_config("tiny-llama").model, 8, 128)
    batch = {
        "tokens": tokens,
        "targets": targets,
        "segment_ids": ids,
        "positions": segment_positions(ids),
        "mask": ids > 0,
        "target_bytes": jnp.sum(ids > 0, axis=1, dtype=jnp.int32),
    }
    batch = {k: np.asarray(v) for k, v in batch.items()}
    after = {}
    for impl in ("xla", "splash"):
        config = load_config("tiny-llama", [*sets, f"model.attention_impl={impl}"])
        plan = RunPlan(config, tokenizer=ByteTokenizer(), check_data=False)
        start = plan.init_state()
        before = jax.device_get(start.params)
        state, metrics = plan.train_step(start, to_global(batch, plan.mesh))
        moved = jax.tree.map(lambda a, b: a - b, jax.device_get(state.params), before)
        after[impl] = (moved, jax.device_get(metrics))
    (ux, mx), (us, ms) = after["xla"], after["splash"]
    np.testing.assert_allclose(ms["loss"], mx["loss"], rtol=1e-6)
    np.testing.assert_allclose(ms["grad_norm"], mx["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(us), jax.tree.leaves(ux), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-8, rtol=1e-3)
    assert max(np.abs(u).max() for u in jax.tree.leaves(ux)) > 1e-6
