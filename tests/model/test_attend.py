"""The attention core's hand-written backward and causal blocks against a naive reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.attend import attend


def _naive(q_BKGTH, k_BSKH, v_BSKH, mask_BTS, cap):
    """Per-head softmax attention written out in jnp, differentiated by autodiff."""
    logits = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BSKH)
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask_BTS[:, None, None], logits, -1e30)
    return jnp.einsum("bkgts,bskh->bkgth", jax.nn.softmax(logits, -1), v_BSKH)


def _inputs(t, s, g, padded):
    rng = np.random.default_rng(t + s + g)
    b, k, h = 2, 2, 8
    q = rng.standard_normal((b, k, g, t, h)).astype(np.float32)
    kv = [rng.standard_normal((b, s, k, h)).astype(np.float32) for _ in range(2)]
    mask = np.tril(np.ones((t, s), bool), s - t)[None].repeat(b, 0)
    if padded:  # row 1: two packed documents and trailing padding that sees only itself
        seg = np.array([1] * (t // 2) + [2] * (t // 4) + [0] * (t - t // 2 - t // 4))
        mask[1] &= seg[:, None] == seg[None, :s]
        mask[1, -1, :] = False  # a row with nothing visible
    return jnp.asarray(q), *map(jnp.asarray, kv), jnp.asarray(mask)


@pytest.mark.parametrize(
    "t,s,g,cap,causal",
    [
        (128, 128, 1, None, True),  # two causal blocks
        (128, 128, 2, 5.0, True),  # grouped queries, soft-capped, two blocks
        (130, 130, 1, None, True),  # two blocks of 65
        (64, 64, 3, None, True),  # one block (short)
        (8, 24, 2, 3.0, False),  # a cache: 8 new queries over 24 slots
    ],
)
def test_attend_matches_naive_attention_and_its_gradients(t, s, g, cap, causal):
    q, k, v, mask = _inputs(t, s, g, padded=causal)
    out = attend(q, k, v, mask, cap, causal=causal)
    ref = _naive(q, k, v, mask, cap)
    live = np.asarray(mask.any(-1))[:, None, None, :, None]  # rows with a visible key
    np.testing.assert_allclose(np.where(live, out, 0), np.where(live, ref, 0), atol=2e-5)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32) * live

    def loss(fn):
        return lambda *a: (
            jnp.sum(fn(*a, mask, cap) * cot)
            if fn is _naive
            else jnp.sum(fn(*a, mask, cap, causal=causal) * cot)
        )

    grads = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(_naive), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 1e-2
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_attend_bfloat16_stays_close_to_float32():
    q, k, v, mask = _inputs(128, 128, 2, padded=False)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    q, k, v = (x.astype(jnp.float32) for x in bf)  # the reference sees the same rounded inputs
    out = attend(*bf, mask, None, causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _naive(q, k, v, mask, None), atol=3e-2)
    g = jax.grad(lambda *a: jnp.sum(attend(*a, mask, None, causal=True).astype(jnp.float32) ** 2))
    want = jax.grad(lambda *a: jnp.sum(_naive(*a, mask, None) ** 2))(q, k, v)
    got = g(*bf)
    assert got.dtype == jnp.bfloat16
    tol = 0.15 * float(jnp.abs(want).max())
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol)
