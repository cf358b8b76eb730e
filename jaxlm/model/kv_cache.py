"""The KV cache: an explicit pytree of keys and values for every layer, plus per-row lengths.

Layout: `k`, `v` are [L, B, S, K, H] (layers, batch, cache length, kv heads, head dim). Row b's
token at position p lives in slot p, so positions, masks and RoPE need no bookkeeping beyond
`lengths[b]`, the number of slots of row b that hold real tokens. Slots at or past `lengths[b]`
may hold garbage (e.g. a prompt's right padding); the causal mask never lets a query see them,
and decoding overwrites them in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig

# Logical axes: batch shards like activations (data/fsdp), kv heads over `tensor` where they
# divide, as the model's activations do; layers, slots and head dims stay whole.
KV_AXES = ("layers", "act_batch", "cache_length", "act_kv_heads", "head_dim")
LENGTHS_AXES = ("act_batch",)


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    lengths: jax.Array  # [B] int32: real tokens per row

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.k[i], self.v[i]


def init_cache(
    config: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens, in the model's compute dtype
    (or `dtype`), constrained to the active mesh's shardings when there is one."""
    if not 1 <= max_length <= config.max_seq_len:
        raise ValueError(
            f"cache length {max_length} must be in [1, model.max_seq_len={config.max_seq_len}]"
        )
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    k = sharding.constrain(jnp.zeros(shape, dtype), KV_AXES)
    v = sharding.constrain(jnp.zeros(shape, dtype), KV_AXES)
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32))


def update(
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    k_new_BTKH: jax.Array,
    v_new_BTKH: jax.Array,
    start_B: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One layer's cache with T new keys/values written at slots start[b] .. start[b]+T-1."""

    def write(cache_SKH: jax.Array, new_TKH: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(
            cache_SKH, new_TKH.astype(cache_SKH.dtype), (start, 0, 0)
        )

    k = jax.vmap(write)(k_BSKH, k_new_BTKH, start_B)
    v = jax.vmap(write)(v_BSKH, v_new_BTKH, start_B)
    axes = KV_AXES[1:]
    return sharding.constrain(k, axes), sharding.constrain(v, axes)
