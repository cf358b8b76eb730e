"""int8 / int4 weight quantization against a NumPy implementation written from the format's
definition: exact integers, packed bytes and scales; a quantized model computes the float model
with NumPy-dequantized weights; QAT's straight-through gradients; bad formats refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.compress.quantize import quantize_params
from jaxlm.configs.overrides import load_config
from jaxlm.configs.quant import QuantConfig
from jaxlm.model import quant
from jaxlm.model.transformer import Transformer
from tests.random_params import random_params


def np_quantize(w, in_axes, bits, group):
    """(int values of w's shape, scales [input groups, outputs], packed bytes or None): the input
    dims moved first and flattened (row-major), g consecutive inputs of one output share a scale
    max|w| * float32(1 / qmax); int4 pairs consecutive inputs, the first in the low nibble."""
    qmax = 2 ** (bits - 1) - 1
    out_axes = [i for i in range(w.ndim) if i not in in_axes]
    moved = np.transpose(w, [*in_axes, *out_axes]).astype(np.float32)
    n_in = int(np.prod([w.shape[i] for i in in_axes]))
    flat = moved.reshape(n_in, -1)
    g = group or n_in
    grouped = flat.reshape(n_in // g, g, -1)
    scale = np.abs(grouped).max(axis=1) * np.float32(1 / qmax)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(grouped / safe[:, None, :]), -qmax, qmax).astype(np.int8)
    q_flat = q.reshape(n_in, -1)
    packed = None
    if bits == 4:
        u = (q_flat.astype(np.int16) & 0xF).astype(np.uint8)
        packed = u[0::2] | (u[1::2] << 4)
    back = np.transpose(q_flat.reshape(moved.shape), np.argsort([*in_axes, *out_axes]))
    return back, scale, packed


def _to_np_layout(x, in_axes):
    """A jaxlm array over the weight's dims as [flattened inputs, flattened outputs]."""
    out_axes = [i for i in range(x.ndim) if i not in in_axes]
    moved = np.transpose(np.asarray(x), [*in_axes, *out_axes])
    n_in = int(np.prod([x.shape[i] for i in in_axes]))
    return moved.reshape(n_in, -1)


CASES = [  # (weight shape, input axes): projections as jaxlm lays them out
    ((64, 48), (0,)),  # MLP up [D, F]
    ((4, 16, 40), (0, 1)),  # attention output [N, H, D]: groups of 32 span two heads
    ((32, 4, 8), (0,)),  # query [D, N, H]
    ((3, 32, 24), (1,)),  # experts [E, D, F]
    ((24, 64), (1,)),  # embedding [V, D]
]


FORMATS = [(8, None), (8, 32), (4, 32), (4, 64), (4, None)]


def _fits(shape, in_axes, group):
    return group is None or int(np.prod([shape[i] for i in in_axes])) % group == 0


@pytest.mark.parametrize(
    "shape,in_axes,bits,group",
    [(*c, *f) for c in CASES for f in FORMATS if _fits(*c, f[1])],
)
def test_quantize_matches_numpy_exactly(shape, in_axes, bits, group):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 3.0, shape[-1])
    w[..., 0] = 0.0  # an all-zero channel: scale 0, values 0
    n_in = int(np.prod([shape[i] for i in in_axes]))
    ref_q, ref_scale, ref_packed = np_quantize(w, in_axes, bits, group)

    scales = quant.full_scale_shape(shape, in_axes, group)
    q, scale = jax.jit(quant.quantize, static_argnums=(1, 2))(jnp.asarray(w), scales, bits)
    np.testing.assert_array_equal(np.asarray(q), ref_q)
    np.testing.assert_array_equal(_to_np_layout(scale, in_axes), ref_scale)
    assert np.abs(ref_q).max() == 2 ** (bits - 1) - 1
    if bits == 4:
        packed = quant.pack_int4(q, in_axes[-1])
        assert packed.dtype == jnp.uint8
        assert packed.shape == quant.stored_shape(shape, in_axes, 4)
        np.testing.assert_array_equal(_to_np_layout(packed, in_axes), ref_packed)
        np.testing.assert_array_equal(np.asarray(quant.unpack_int4(packed, in_axes[-1])), ref_q)
    # Dequantized: every value within half a step of its block's scale.
    deq = np.asarray(quant.dequantize(q, scale, jnp.float32))
    step = np.repeat(ref_scale, group or n_in, axis=0)
    err = np.abs(_to_np_layout(deq - w, in_axes))
    assert np.all(err <= step / 2 * (1 + 1e-6) + 1e-12)


def np_dequantize_tree(qparams, float_params, bits):
    """The float parameter tree a quantized one stands for, by NumPy: unpack, then repeat each
    scale over its block."""
    out = {}
    for key, value in float_params.items():
        if isinstance(value, dict):
            out[key] = np_dequantize_tree(qparams[key], value, bits)
        elif f"{key}_q" in qparams:
            q = np.asarray(qparams[f"{key}_q"])
            scale = np.asarray(qparams[f"{key}_scale"])
            if bits == 4:
                axis = next(i for i in range(q.ndim) if q.shape[i] * 2 == value.shape[i])
                lo = (q & 0xF).astype(np.int8)
                hi = (q >> 4).astype(np.int8)
                both = np.stack([lo, hi], axis=axis + 1).reshape(value.shape)
                q = np.where(both > 7, both - 16, both)
            for i in range(q.ndim):
                scale = np.repeat(scale, value.shape[i] // scale.shape[i], axis=i)
            out[key] = (q.astype(np.float32) * scale).astype(np.float32)
        else:
            out[key] = np.asarray(qparams[key])
    return out


@pytest.mark.parametrize(
    "preset,fmt",
    [
        ("tiny-llama", QuantConfig(bits=8)),
        ("tiny-llama", QuantConfig(bits=4, group=32, embed=True)),
        ("tiny", QuantConfig(bits=4, group=16)),
        ("tiny-moe", QuantConfig(bits=8, group=32, embed=True)),
    ],
    ids=["llama-int8", "llama-int4-g32-embed", "gpt-int4-g16", "moe-int8-g32-embed"],
)
def test_a_quantized_model_computes_the_float_model_with_numpy_dequantized_weights(preset, fmt):
    cfg = load_config(preset, ["model.tie_embeddings=false"] if fmt.embed else []).model
    params = random_params(cfg, seed=3)
    qcfg, qparams = quantize_params(cfg, params, fmt)
    assert qcfg.quant == fmt
    leaves = jax.tree_util.tree_leaves_with_path(qparams)
    ints = [jax.tree_util.keystr(p) for p, x in leaves if x.dtype in (jnp.int8, jnp.uint8)]
    assert any("mlp" in n or "experts" in n or "moe" in n for n in ints)
    assert any("embed" in n for n in ints) == fmt.embed
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    got = Transformer(qcfg).apply({"params": qparams}, tokens)[0]
    reference = np_dequantize_tree(qparams, jax.device_get(params), fmt.bits)
    want = Transformer(cfg).apply({"params": reference}, tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # ...and it is not the float model: quantization changed the logits.
    plain = Transformer(cfg).apply({"params": params}, tokens)[0]
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-4


def test_int8_dot_matches_numpy_integer_products():
    """int8 x int8 -> int32 with activations quantized per token, against NumPy's integers."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    w = rng.standard_normal((32, 4, 8)).astype(np.float32)
    q, scale = quant.quantize(jnp.asarray(w), (1, 4, 8), 8)
    got = quant.int8_einsum("BTD,DNH->BTNH", jnp.asarray(x), q, scale, "float32")
    xs = np.abs(x).max(-1, keepdims=True) * np.float32(1 / 127)
    xq = np.round(x / xs).astype(np.int32)
    acc = np.einsum("btd,dnh->btnh", xq, np.asarray(q).astype(np.int32))
    want = acc.astype(np.float32) * xs[..., None] * np.asarray(scale)[0][None, None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # ...within int8's error of the float product.
    exact = np.einsum("btd,dnh->btnh", x, w)
    assert np.abs(np.asarray(got) - exact).max() < 0.05 * np.abs(exact).max()


def test_qat_forward_is_quantized_and_gradients_pass_straight_through():
    cfg = load_config("tiny-llama").model
    qat = dataclasses.replace(cfg, quant=QuantConfig(bits=4, group=32, qat=True))
    params = random_params(cfg, seed=4)  # QAT keeps the float parameters
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    _, stored = quantize_params(cfg, params, QuantConfig(bits=4, group=32))
    stored_cfg = dataclasses.replace(cfg, quant=QuantConfig(bits=4, group=32))
    fake = Transformer(qat).apply({"params": params}, tokens)[0]
    real = Transformer(stored_cfg).apply({"params": stored}, tokens)[0]
    np.testing.assert_allclose(np.asarray(fake), np.asarray(real), rtol=2e-5, atol=2e-5)

    # Straight through: d/dw of sum(fake_quant(w) * c) is c, where rounding has no gradient.
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 8)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(2).standard_normal((64, 8)), jnp.float32)
    fmt = QuantConfig(bits=4, group=32, qat=True)
    g = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, (0,), fmt) * c))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


@pytest.mark.parametrize(
    "sets,match",
    [
        (["model.quant.bits=3"], r"QuantConfig.bits=3 is not valid; choose 8 \(int8\), 4"),
        (
            ["model.quant.bits=4", "model.quant.group=48"],
            r"group=48 does not divide the attention query/key/value's input \(64 elements per "
            r"output channel\); valid here: \[8, 16, 32, 64\]",
        ),
        (["model.quant.bits=4", "model.quant.group=7"], r"group=7 must be an even integer"),
        (["model.quant.group=32"], r"need QuantConfig.bits=8 or 4"),
        (["model.quant.bits=4", "model.quant.int8_dot=true"], r"int8_dot=True .* needs bits=8"),
    ],
)
def test_bad_formats_are_refused_naming_the_value(sets, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny-llama", sets)


def test_quantizing_twice_is_refused():
    cfg = load_config("tiny-llama").model
    _, q = quantize_params(cfg, random_params(cfg), QuantConfig(bits=8))
    qcfg = dataclasses.replace(cfg, quant=QuantConfig(bits=8))
    with pytest.raises(ValueError, match=r"already quantized \(model.quant: int8 per channel\)"):
        quantize_params(qcfg, q, QuantConfig(bits=4, group=32))
