"""Quantized weights: blockwise symmetric int8 / int4 (packed two per byte) with float scales,
dequantized on the fly, and fake quantization with straight-through gradients (QAT).

A weight of shape S and its scale of shape s (same rank, s_i dividing S_i) form blocks of
S_i / s_i elements along each dim, one scale per block: per output channel the blocks span all
input dims (s_i = 1 there, s_i = S_i over the output dims); group-wise they span g consecutive
input elements (`jaxlm.configs.quant.scale_shape`). Within a block, scale = max|w| · (1 / qmax) and
q = round(w / scale) (half to even) in [-qmax, qmax], qmax = 127 (int8) or 7 (int4); a block of
zeros has scale 0 and q 0. int4 values are stored as uint8 pairs along the weight's last input
dim: element 2j in the low nibble, 2j + 1 in the high one, each as 4-bit two's complement.

The stored parameters of a weight `name` are `name_q` (int8 of the weight's shape, or uint8 with
the packed dim halved) and `name_scale` (float32), with the weight's logical axes: dims a scale
reduces to 1 are unnamed (replicated), the rest keep their axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.configs.quant import QuantConfig, scale_shape

Initializer = jax.nn.initializers.Initializer


def contracted(eqn: str) -> tuple[int, ...]:
    """The weight dims of einsum `eqn` ('x,w->y') that are contracted with the input."""
    inputs = eqn.replace(" ", "").split("->")[0]
    x_letters, w_letters = inputs.split(",")
    return tuple(i for i, c in enumerate(w_letters) if c in x_letters)


def full_scale_shape(
    shape: Sequence[int], in_axes: Sequence[int], group: int | None, what: str = "weight"
) -> tuple[int, ...]:
    """The scale's shape for a weight of `shape` whose input dims are `in_axes`."""
    reduced = scale_shape([shape[i] for i in in_axes], group, what)
    out = list(shape)
    for i, n in zip(in_axes, reduced, strict=True):
        out[i] = n
    return tuple(out)


def _blocks(shape: Sequence[int], scales: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """(the weight's shape as (s_0, r_0, s_1, r_1, ...), the scale's as (s_0, 1, s_1, 1, ...))."""
    w, s = [], []
    for n, k in zip(shape, scales, strict=True):
        if n % k:
            raise ValueError(f"scale shape {tuple(scales)} does not tile weight shape {shape}")
        w += [k, n // k]
        s += [k, 1]
    return tuple(w), tuple(s)


def quantize(w: jax.Array, scales: Sequence[int], bits: int) -> tuple[jax.Array, jax.Array]:
    """(int8 values of w's shape, float32 scales of shape `scales`): symmetric round-to-nearest
    per block (not packed; see `pack_int4`)."""
    qmax = 2 ** (bits - 1) - 1
    wb, _ = _blocks(w.shape, scales)
    x = w.astype(jnp.float32).reshape(wb)
    axes = tuple(range(1, len(wb), 2))
    # times float32(1 / qmax), not / qmax: what XLA computes for a division by a constant.
    scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) * jnp.float32(1 / qmax)
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
    q = jnp.clip(q, -qmax, qmax).astype(jnp.int8).reshape(w.shape)
    return q, scale.reshape(tuple(scales))


def dequantize(q: jax.Array, scale: jax.Array, dtype: jnp.dtype | str) -> jax.Array:
    """q * scale (block-broadcast), in `dtype`; `q` unpacked (int8 of the weight's shape)."""
    wb, sb = _blocks(q.shape, scale.shape)
    w = q.astype(dtype).reshape(wb) * scale.astype(dtype).reshape(sb)
    return w.reshape(q.shape)


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """int8 values in [-8, 7] packed two per uint8 along `axis` (even length): element 2j in the
    low nibble, 2j + 1 in the high one."""
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 2:
        raise ValueError(f"int4 packing needs an even dim, got {n} at axis {axis} of {q.shape}")
    pairs = q.reshape(*q.shape[:axis], n // 2, 2, *q.shape[axis + 1 :]).astype(jnp.uint8)
    lo = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False) & 0xF
    hi = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False) & 0xF
    return lo | (hi << 4)


def unpack_int4(p: jax.Array, axis: int) -> jax.Array:
    """The inverse of `pack_int4`: int8 values, `axis` twice as long."""
    axis = axis % p.ndim
    nibbles = jnp.stack([p & 0xF, p >> 4], axis=axis + 1).astype(jnp.int8)
    signed = jnp.where(nibbles > 7, nibbles - 16, nibbles).astype(jnp.int8)
    shape = list(p.shape)
    shape[axis] *= 2
    return signed.reshape(shape)


def stored_shape(shape: Sequence[int], in_axes: Sequence[int], bits: int) -> tuple[int, ...]:
    """The stored values' shape: the weight's, with the last input dim halved for int4."""
    out = list(shape)
    if bits == 4:
        out[in_axes[-1]] //= 2
    return tuple(out)


def fake_quant(
    w: jax.Array, in_axes: Sequence[int], quant: QuantConfig, what: str = "weight"
) -> jax.Array:
    """w's quantized-then-dequantized value in the forward pass, identity in the backward pass
    (the straight-through estimator)."""
    scales = full_scale_shape(w.shape, in_axes, quant.group, what)
    q, scale = quantize(jax.lax.stop_gradient(w), scales, quant.bits)
    return w + jax.lax.stop_gradient(dequantize(q, scale, w.dtype) - w)


def quant_weight(
    module: nn.Module,
    name: str,
    init_fn: Initializer,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    in_axes: Sequence[int],
    quant: QuantConfig | None,
    param_dtype: str,
    dtype: str,
) -> jax.Array:
    """`module`'s weight `name` in `dtype`: the float parameter (fake-quantized under QAT), or
    stored values and scales (`name_q`, `name_scale`) dequantized."""
    if quant is None or not quant.bits:
        return module.param(
            name, nn.with_logical_partitioning(init_fn, axes), shape, param_dtype
        ).astype(dtype)
    if quant.qat:
        w = module.param(name, nn.with_logical_partitioning(init_fn, axes), shape, param_dtype)
        return fake_quant(w.astype(jnp.float32), in_axes, quant, name).astype(dtype)
    q, scale = stored_params(module, name, shape, axes, in_axes, quant)
    if quant.bits == 4:
        q = unpack_int4(q, in_axes[-1])
    return dequantize(q, scale, dtype)


def stored_params(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    in_axes: Sequence[int],
    quant: QuantConfig,
) -> tuple[jax.Array, jax.Array]:
    """`module`'s (`name_q`, `name_scale`) parameters for a weight of `shape` (zeros and ones
    at init: stored weights come from `jaxlm.compress.quantize`)."""
    scales = full_scale_shape(shape, in_axes, quant.group, name)
    scale_axes = tuple(a if n > 1 else None for a, n in zip(axes, scales, strict=True))
    dt = jnp.int8 if quant.bits == 8 else jnp.uint8
    q = module.param(
        f"{name}_q",
        nn.with_logical_partitioning(jax.nn.initializers.zeros, axes),
        stored_shape(shape, in_axes, quant.bits),
        dt,
    )
    scale = module.param(
        f"{name}_scale",
        nn.with_logical_partitioning(jax.nn.initializers.ones, scale_axes),
        scales,
        jnp.float32,
    )
    return q, scale


def int8_einsum(eqn: str, x: jax.Array, q: jax.Array, scale: jax.Array, dtype: str) -> jax.Array:
    """einsum(eqn, x, q * scale) with x quantized to int8 per token (one scale per element of
    x's non-contracted dims) and the product accumulated in int32; `scale` per output channel."""
    inputs, out = eqn.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    xf = x.astype(jnp.float32)
    x_axes = tuple(i for i, c in enumerate(x_letters) if c in w_letters)
    x_scale = jnp.max(jnp.abs(xf), axis=x_axes, keepdims=True) * jnp.float32(1 / 127)
    xq = jnp.round(xf / jnp.where(x_scale > 0, x_scale, 1.0)).astype(jnp.int8)
    y = jnp.einsum(eqn, xq, q, preferred_element_type=jnp.int32).astype(jnp.float32)
    keep_x = "".join(c for c in x_letters if c not in w_letters)
    keep_w = "".join(c for c in w_letters if c not in x_letters)
    w_scale = scale.reshape([scale.shape[w_letters.index(c)] for c in keep_w])
    x_scale = x_scale.reshape([x_scale.shape[x_letters.index(c)] for c in keep_x])
    y = jnp.einsum(f"{out},{keep_x},{keep_w}->{out}", y, x_scale, w_scale)
    return y.astype(dtype)


__all__ = [
    "contracted",
    "dequantize",
    "fake_quant",
    "full_scale_shape",
    "int8_einsum",
    "pack_int4",
    "quant_weight",
    "quantize",
    "stored_params",
    "stored_shape",
    "unpack_int4",
]
