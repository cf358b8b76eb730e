"""Leaf layers: initializer scales, the Einsum bias, norms against NumPy."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import ModelConfig
from jaxlm.model.layers import Einsum, Norm
from jaxlm.model.mlp import ACTIVATIONS
from jaxlm.model.transformer import init_params

D, N, H, F, L = 256, 4, 64, 512, 2


@functools.cache
def _init(init):
    cfg = ModelConfig(
        vocab_size=512, d_model=D, num_layers=L, num_heads=N, mlp_dim=F, init=init, init_std=0.05
    )
    return init_params(cfg, jax.random.key(0))


# Expected standard deviations, from the textbook formulas. Output projections (attention out,
# MLP down) are depth-scaled: variance / (2 L).
EXPECTED = {
    "normal": {"query": 0.05, "up": 0.05, "out": 0.05 / math.sqrt(2 * L), "down": 0.05 / 2},
    # Glorot: var = 2 / (fan_in + fan_out)
    "xavier": {
        "query": math.sqrt(2 / (D + N * H)),
        "up": math.sqrt(2 / (D + F)),
        "out": math.sqrt(2 / (N * H + D) / (2 * L)),
        "down": math.sqrt(2 / (F + D) / (2 * L)),
    },
    # He: var = 2 / fan_in
    "kaiming": {
        "query": math.sqrt(2 / D),
        "up": math.sqrt(2 / D),
        "out": math.sqrt(2 / (N * H) / (2 * L)),
        "down": math.sqrt(2 / F / (2 * L)),
    },
}


@pytest.mark.parametrize("init", list(EXPECTED))
def test_initializer_scales(init):
    params = _init(init)
    weights = {
        "query": params["layers"]["attn"]["query"]["w"],
        "out": params["layers"]["attn"]["out"]["w"],
        "up": params["layers"]["mlp"]["up"]["w"],
        "down": params["layers"]["mlp"]["down"]["w"],
    }
    for name, want in EXPECTED[init].items():
        got = float(np.std(np.asarray(weights[name])))
        assert got == pytest.approx(want, rel=0.03), (name, got, want)
    assert float(np.std(np.asarray(params["embed"]["embedding"]))) == pytest.approx(0.05, rel=0.03)
    # Layers of a scanned stack get different draws.
    q = np.asarray(weights["query"])
    assert not np.allclose(q[0], q[1])


def test_einsum_bias_covers_the_weight_output_dims():
    layer = Einsum(
        (3, 4, 5), ("embed", "heads", "head_dim"), jax.nn.initializers.normal(1.0), use_bias=True
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 3)), jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(0), "BTD,DNH->BTNH", x)["params"])
    params = jax.tree.map(lambda p: p + 0.5, params)  # a non-zero bias
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    assert b.shape == (4, 5)
    got = layer.apply({"params": params}, "BTD,DNH->BTNH", x)
    np.testing.assert_allclose(got, np.einsum("btd,dnh->btnh", x, w) + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "eqn, x_shape, w_shape, merged",
    [
        ("BTNH,NHD->BTD", (2, 7, 4, 5), (4, 5, 3), "ZNH,NHD->ZD"),  # the attention output
        ("ABTD,DF->ABTF", (2, 3, 4, 5), (5, 6), "ZD,DF->ZF"),  # three leading dims
        ("TBD,DF->BTF", (7, 2, 3), (3, 6), None),  # leading dims reordered: left as is
        ("BD,DF->BF", (7, 3), (3, 6), None),  # one leading dim: nothing to merge
    ],
)
def test_einsum_merged_leading_dims_match_numpy(eqn, x_shape, w_shape, merged):
    """Einsum runs x's leading pass-through dims as one matmul dim; the result (with the bias and
    a LoRA adapter on the same equation) is NumPy's einsum of the equation as written."""
    from jaxlm.configs import LoRAConfig
    from jaxlm.model.layers import merge_leading

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    assert merge_leading(eqn, x)[0] == (merged or eqn)
    lora = LoRAConfig(rank=2, alpha=4.0, targets="query")
    layer = Einsum(
        w_shape, (None,) * len(w_shape), jax.nn.initializers.normal(1.0), True, lora=lora
    )
    params = nn.meta.unbox(layer.init(jax.random.key(0), eqn, x)["params"])
    params = jax.tree.map(lambda p: p + rng.standard_normal(p.shape).astype(np.float32), params)
    got = layer.apply({"params": params}, eqn, x)
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    a, bb = np.asarray(params["lora_a"]), np.asarray(params["lora_b"])
    x_np = np.asarray(x, np.float64)
    ins, out = eqn.split("->")
    x_l, w_l = ins.split(",")
    in_l = "".join(c for c in w_l if c in x_l)
    out_l = "".join(c for c in w_l if c not in x_l)
    delta = np.einsum(f"{x_l},{in_l}r,r{out_l}->{out}", x_np, a, bb)
    want = np.einsum(eqn, x_np, w) + b + lora.scale * delta
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "eqn, x_shape, w_shape",
    [
        ("ZNH,NHD->ZD", (3, 4, 5), (4, 5, 6)),  # two contracted dims, taken in the weight's order
        ("ZD,VD->ZV", (3, 6), (7, 6)),  # the tied output embedding
        ("ZD,DF->FZ", (3, 6), (6, 2)),  # output dims reordered
        ("ECI,EIO->ECO", (2, 3, 4), (2, 4, 5)),  # a batch dim (experts): einsum's own way
        ("ZDK,DF->ZF", (3, 6, 2), (6, 4)),  # a summed dim: einsum's own way
    ],
)
def test_weight_einsum_matches_numpy(eqn, x_shape, w_shape):
    from jaxlm.model.layers import weight_einsum

    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    got = weight_einsum(eqn, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, np.einsum(eqn, x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind, use_bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)]
)
def test_norms_match_numpy(kind, use_bias):
    x = np.random.default_rng(0).standard_normal((2, 3, 8)) * 3 + 1
    norm = Norm(kind=kind, eps=1e-6, use_bias=use_bias, dtype="bfloat16")
    scale = np.linspace(0.5, 1.5, 8)
    params = {"scale": jnp.asarray(scale, jnp.float32)} | (
        {"bias": jnp.full((8,), 0.25)} if use_bias else {}
    )
    got = norm.apply({"params": params}, jnp.asarray(x, jnp.float32))
    assert got.dtype == jnp.bfloat16  # computed in float32, returned in the compute dtype
    centred = x - x.mean(-1, keepdims=True) if kind == "layernorm" else x
    want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * scale
    want = want + 0.25 if use_bias else want
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def _gelu_tanh_numpy(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "relu", "swiglu", "geglu"])
def test_recomputed_activations_match_autodiff_of_the_plain_function(name):
    """The activations' hand-written backward (input saved, derivative recomputed) against
    autodiff of the jax.nn function, and GELU-tanh's values against NumPy."""
    plain = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "swiglu": jax.nn.silu,
        "geglu": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 64)) * 3, jnp.float32)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    act = ACTIVATIONS[name]
    y, vjp = jax.vjp(act, x)
    want_y, want_vjp = jax.vjp(plain, x)
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(ct)[0], want_vjp(ct)[0], rtol=1e-5, atol=1e-6)
    # Inside jit and under remat, as the train step uses it.
    # XLA's fused tanh/erf differ from the eager ones by a few float32 ulps of the gradient.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jax.checkpoint(act)(x) * ct)))(x)
    np.testing.assert_allclose(grad, want_vjp(ct)[0], rtol=1e-5, atol=1e-5)
    if name == "gelu_tanh":
        np.testing.assert_allclose(y, _gelu_tanh_numpy(np.asarray(x)), rtol=1e-5, atol=1e-6)
