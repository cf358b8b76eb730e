"""LoRA: a low-rank adapter beside a projection (y = x W + (alpha / r) · (x A) B, B born zero so
an adapted model starts equal to its base), and merging adapters into plain weights."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.configs.model import LoRAConfig, ModelConfig

ADAPTER_PARAMS = ("lora_a", "lora_b", "prompt_embedding")


def is_adapter(name: str) -> bool:
    """Whether the '/'-joined parameter path `name` is an adapter: a LoRA matrix (`lora_a`,
    `lora_b`, or an expert weight's `<name>_lora_a` / `_lora_b`) or the prompt embeddings."""
    last = name.rsplit("/", 1)[-1]
    return last in ADAPTER_PARAMS or last.endswith(("_lora_a", "_lora_b"))


def _a_init(n_in: int) -> Any:
    # kaiming-uniform with a = sqrt(5), as PEFT initialises A: U(±1/sqrt(fan_in))
    return jax.nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=n_in
    )


def dropout(module: nn.Module, lora: LoRAConfig, x: jax.Array) -> jax.Array:
    """LoRA's input dropout: only while training (eval passes no "dropout" rng)."""
    if not lora.dropout or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - lora.dropout, x.shape)
    return jnp.where(keep, x / (1 - lora.dropout), 0)


def expert_adapters(
    module: nn.Module, lora: LoRAConfig, name: str, shape: tuple[int, int, int], axes: tuple
) -> tuple[jax.Array, jax.Array]:
    """A [E, in, r] and B [E, r, out] beside the expert weight `name` [E, in, out], float32, B
    at zero, sharded like the weight's expert and feature dims."""
    e, n_in, n_out = shape
    a = module.param(
        f"{name}_lora_a",
        nn.with_logical_partitioning(
            jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", 1, 2, batch_axis=0),
            (axes[0], axes[1], None),
        ),
        (e, n_in, lora.rank),
        jnp.float32,
    )
    b = module.param(
        f"{name}_lora_b",
        nn.with_logical_partitioning(jax.nn.initializers.zeros, (axes[0], None, axes[2])),
        (e, lora.rank, n_out),
        jnp.float32,
    )
    return a, b


def lora_delta(
    module: nn.Module,
    lora: LoRAConfig,
    eqn: str,
    x: jax.Array,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: Any,
) -> jax.Array:
    """The adapter's output for `module`'s weight of `shape` (logical `axes`) applied by `eqn`.

    A holds the weight's input dims (those contracted with x) and the rank, B the rank and the
    output dims, each sharded like the weight's dims they stand for. Adapters are float32.
    """
    inputs, out = eqn.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    into = [i for i, c in enumerate(w_letters) if c in x_letters]
    onto = [i for i, c in enumerate(w_letters) if c not in x_letters]
    in_l = "".join(w_letters[i] for i in into)
    out_l = "".join(w_letters[i] for i in onto)
    keep = "".join(c for c in out if c in x_letters)
    n_in = len(into)
    a = module.param(
        "lora_a",
        nn.with_logical_partitioning(_a_init(n_in), (*(axes[i] for i in into), None)),
        (*(shape[i] for i in into), lora.rank),
        jnp.float32,
    )
    b = module.param(
        "lora_b",
        nn.with_logical_partitioning(jax.nn.initializers.zeros, (None, *(axes[i] for i in onto))),
        (lora.rank, *(shape[i] for i in onto)),
        jnp.float32,
    )
    x = dropout(module, lora, x)
    xa = jnp.einsum(f"{x_letters},{in_l}r->{keep}r", x.astype(dtype), a.astype(dtype))
    return lora.scale * jnp.einsum(f"{keep}r,r{out_l}->{out}", xa, b.astype(dtype))


def _merge_tree(tree: dict, scale: float) -> dict:
    out = {}
    for key, value in tree.items():
        if not isinstance(value, dict):
            if key.endswith(("_lora_a", "_lora_b")):
                continue  # expert adapters: folded into their weight below
            if f"{key}_lora_a" in tree:  # an expert weight [..., E, in, out]
                a, b = tree[f"{key}_lora_a"], tree[f"{key}_lora_b"]
                delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
                value = (value.astype(jnp.float32) + scale * delta).astype(value.dtype)
            out[key] = value
        elif "lora_a" in value and "w" in value:
            a, b, w = value["lora_a"], value["lora_b"], value["w"]
            lead = a.ndim + b.ndim - w.ndim - 2  # scanned layers stack a leading dim
            in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1 :]
            a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]).astype(jnp.float32)
            b2 = b.reshape(*b.shape[: lead + 1], -1).astype(jnp.float32)
            delta = jnp.matmul(a2, b2).reshape(*w.shape[:lead], *in_shape, *out_shape)
            merged = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
            out[key] = {k: v for k, v in value.items() if k not in ("lora_a", "lora_b")}
            out[key]["w"] = merged
        else:
            out[key] = _merge_tree(value, scale)
    return out


def merge_lora(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(the config without adapters, parameters with W + (alpha / r) · A B folded into each
    adapted weight): a plain model that computes what the adapted one does."""
    import dataclasses

    if not config.lora.rank:
        return config, params
    plain = dataclasses.replace(config, lora=LoRAConfig())
    return plain, _merge_tree(params, config.lora.scale)
