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
    """Whether the '/'-joined parameter path `name` is an adapter: a LoRA matrix or the
    prompt-tuning embeddings."""
    return name.rsplit("/", 1)[-1] in ADAPTER_PARAMS


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
        nn.with_logical_partitioning(
            # kaiming-uniform with a = sqrt(5), as PEFT initialises A: U(±1/sqrt(fan_in))
            jax.nn.initializers.variance_scaling(
                1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=n_in
            ),
            (*(axes[i] for i in into), None),
        ),
        (*(shape[i] for i in into), lora.rank),
        jnp.float32,
    )
    b = module.param(
        "lora_b",
        nn.with_logical_partitioning(jax.nn.initializers.zeros, (None, *(axes[i] for i in onto))),
        (lora.rank, *(shape[i] for i in onto)),
        jnp.float32,
    )
    if lora.dropout and module.has_rng("dropout"):  # training only (eval passes no dropout rng)
        keep_mask = jax.random.bernoulli(module.make_rng("dropout"), 1 - lora.dropout, x.shape)
        x = jnp.where(keep_mask, x / (1 - lora.dropout), 0)
    xa = jnp.einsum(f"{x_letters},{in_l}r->{keep}r", x.astype(dtype), a.astype(dtype))
    return lora.scale * jnp.einsum(f"{keep}r,r{out_l}->{out}", xa, b.astype(dtype))


def _merge_tree(tree: dict, scale: float) -> dict:
    out = {}
    for key, value in tree.items():
        if not isinstance(value, dict):
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
