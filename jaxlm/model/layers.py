"""Leaf modules: `Einsum` (equation at the call site), norms, token embeddings with tied decode."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.configs.model import LoRAConfig, ModelConfig
from jaxlm.configs.quant import QuantConfig
from jaxlm.model.lora import lora_delta
from jaxlm.model.quant import (
    contracted,
    dequantize,
    fake_quant,
    int8_einsum,
    quant_weight,
    stored_params,
    unpack_int4,
)

Initializer = jax.nn.initializers.Initializer


def kernel_init(
    config: ModelConfig,
    in_axis: int | Sequence[int],
    out_axis: int | Sequence[int],
    output_projection: bool = False,
) -> Initializer:
    """The initializer `config.init` names, with fans taken over `in_axis` / `out_axis`.

    With `config.depth_scaled_init`, residual output projections get their variance divided by
    2 * num_layers (one attention and one MLP write per layer).
    """
    depth = 1.0 / (2 * config.num_layers) if output_projection and config.depth_scaled_init else 1.0
    if config.init == "normal":
        return jax.nn.initializers.normal(config.init_std * depth**0.5)
    if config.init == "xavier":
        return jax.nn.initializers.variance_scaling(
            depth, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis
        )
    return jax.nn.initializers.variance_scaling(
        2.0 * depth, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


def merge_leading(eqn: str, x: jax.Array) -> tuple[str, jax.Array, tuple[int, ...]]:
    """(`eqn` with x's leading dims that pass straight to the output merged into one letter,
    x reshaped to match, the merged dims' sizes to restore on the output); unchanged when fewer
    than two such dims lead.

    'BTD,DF->BTF' becomes 'ZD,DF->ZF' on x of [B*T, D]. The result is the same, but XLA:CPU
    then runs the weight gradient's matmul on the [B*T, F] cotangent as it is, where with B and T
    apart it first copies it transposed (the "small" preset's train step ran 1.4x slower, its MLP
    3x). TPU and GPU compilers canonicalise dots to [batch, M, K] themselves. The merged dims must
    not be split over different mesh axes (today only the batch dim is; the sequence never is).
    """
    inputs, out = eqn.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    n = 0
    for a, b in zip(x_letters, out, strict=False):
        if a != b or a in w_letters:
            break
        n += 1
    if n < 2:
        return eqn, x, ()
    letter = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eqn)
    merged = f"{letter}{x_letters[n:]},{w_letters}->{letter}{out[n:]}"
    return merged, x.reshape(-1, *x.shape[n:]), x.shape[:n]


def weight_einsum(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(eqn, x, w)` for an equation without batch dims, with the contracted dims
    taken in the weight's order.

    `jnp.einsum` hands XLA the contracted dims in its own order ('BTNH,NHD->BTD' contracts H
    before N), and XLA then copies the weight into that order, inside a decode loop at every
    step (4 copies of a 256 KiB weight per token in the decode benchmark). Taking them in the
    weight's order leaves the weight as it is stored.
    """
    inputs, out = eqn.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    both = [c for c in w_letters if c in x_letters]
    free = [c for c in x_letters + w_letters if c not in both]
    if sorted(free) != sorted(out) or len(set(x_letters)) + len(set(w_letters)) != len(
        x_letters + w_letters
    ):  # batch dims, sums or repeated letters: einsum's own way
        return jnp.einsum(eqn, x, w)
    contract = (tuple(x_letters.index(c) for c in both), tuple(w_letters.index(c) for c in both))
    y = jax.lax.dot_general(x, w, (contract, ((), ())))
    return y if free == list(out) else jnp.transpose(y, tuple(free.index(c) for c in out))


class Einsum(nn.Module):
    """A weight `w` of `shape` (logical `axes`) applied by the einsum equation given at the call.

    With `use_bias`, a zero-initialised bias `b` is added over the output dims that come from the
    weight (e.g. N and H for 'BTD,DNH->BTNH').
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init_fn: Initializer
    use_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora: LoRAConfig | None = None  # a low-rank adapter beside `w` (`jaxlm.model.lora`)
    # Stored int8/int4 weights (`w_q`, `w_scale`) or fake quantization (`jaxlm.model.quant`).
    quant: QuantConfig | None = None

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        in_axes = contracted(eqn)
        quant = self.quant if self.quant is not None and self.quant.bits else None
        if quant is not None and quant.int8_dot:
            q, scale = stored_params(self, "w", self.shape, self.axes, in_axes, quant)
            eqn, x, lead = merge_leading(eqn, x)
            y = int8_einsum(eqn, x, q, scale, self.dtype)
        else:
            w = quant_weight(
                self, "w", self.init_fn, self.shape, self.axes, in_axes, quant,
                self.param_dtype, self.dtype,
            )  # fmt: skip
            eqn, x, lead = merge_leading(eqn, x)
            y = weight_einsum(eqn, x.astype(self.dtype), w)
        if self.lora is not None:
            y = y + lora_delta(self, self.lora, eqn, x, self.shape, self.axes, self.dtype)
        if self.use_bias:
            inputs, out = eqn.replace(" ", "").split("->")
            x_letters, w_letters = inputs.split(",")
            dims = [w_letters.index(c) for c in out if c in w_letters and c not in x_letters]
            if [w_letters.index(c) for c in out[-len(dims) :]] != dims:
                raise ValueError(f"bias dims of {eqn!r} must be the trailing output dims")
            b = self.param(
                "b",
                nn.with_logical_partitioning(
                    jax.nn.initializers.zeros, tuple(self.axes[i] for i in dims)
                ),
                tuple(self.shape[i] for i in dims),
                self.param_dtype,
            )
            y = y + b.astype(self.dtype).reshape((1,) * (y.ndim - b.ndim) + b.shape)
        return y.reshape(*lead, *y.shape[1:]) if lead else y


class Norm(nn.Module):
    """LayerNorm (with or without bias) or RMSNorm over the last dim, computed in float32."""

    kind: str
    eps: float
    use_bias: bool
    axis_name: str = "norm"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(jax.nn.initializers.ones, (self.axis_name,)),
            (features,),
            self.param_dtype,
        )
        y = x.astype(jnp.float32)
        if self.kind == "layernorm":
            y = y - jnp.mean(y, axis=-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        lead = (1,) * (y.ndim - 1)
        y = y * scale.astype(jnp.float32).reshape(*lead, features)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(jax.nn.initializers.zeros, (self.axis_name,)),
                (features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32).reshape(*lead, features)
        return y.astype(self.dtype)


def make_norm(config: ModelConfig, name: str, axis_name: str = "norm") -> Norm:
    """The norm `config` asks for, as a submodule called `name`."""
    return Norm(
        kind=config.norm,
        eps=config.norm_eps,
        use_bias=config.norm_bias,
        axis_name=axis_name,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` reuses it as the output projection (tied).

    With `quant` (bits set and `embed`), the table is stored quantized per row (its D input dim
    grouped) or fake-quantized under QAT; a lookup dequantizes only the rows it takes.
    """

    vocab_size: int
    features: int
    init_std: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    quant: QuantConfig | None = None

    def setup(self) -> None:
        shape = (self.vocab_size, self.features)
        if self._stored is not None:
            self.embedding_q, self.embedding_scale = stored_params(
                self, "embedding", shape, self.axes, (1,), self._stored
            )
            return
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(jax.nn.initializers.normal(self.init_std), self.axes),
            shape,
            self.param_dtype,
        )

    @property
    def _quant(self) -> QuantConfig | None:
        q = self.quant
        return q if q is not None and q.bits and q.embed else None

    @property
    def _stored(self) -> QuantConfig | None:
        q = self._quant
        return q if q is not None and q.stored else None

    def _rows(self, q: jax.Array, scale: jax.Array) -> jax.Array:
        if self._stored.bits == 4:
            q = unpack_int4(q, -1)
        return dequantize(q, scale, self.dtype)

    def table(self) -> jax.Array:
        """The [V, D] table in the compute dtype (dequantized, or fake-quantized under QAT)."""
        if self._stored is not None:
            return self._rows(self.embedding_q, self.embedding_scale)
        if self._quant is not None:  # QAT
            return fake_quant(self.embedding.astype(jnp.float32), (1,), self._quant).astype(
                self.dtype
            )
        return self.embedding.astype(self.dtype)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        if self._stored is not None:
            q = jnp.take(self.embedding_q, tokens_BT, axis=0)
            return self._rows(q, jnp.take(self.embedding_scale, tokens_BT, axis=0))
        if self._quant is not None:
            return jnp.take(self.table(), tokens_BT, axis=0)
        table = self.embedding
        if sharding.axis_size("context") > 1:
            # Under context parallelism the table is gathered over `context` first: XLA cannot
            # reshard a lookup split over fsdp x context into rows split over the batch and the
            # sequence, and would replicate the whole [B, T, D] output instead.
            table = sharding.constrain(table, self.axes, exclude=("context",))
        return jnp.take(table, tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        eqn, x_ND, lead = merge_leading("BTD,VD->BTV", x_BTD.astype(self.dtype))
        logits = jnp.einsum(eqn, x_ND, self.table())
        return logits.reshape(*lead, logits.shape[-1])
