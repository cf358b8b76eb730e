"""The KV cache: an explicit pytree of keys and values for every layer, plus per-row lengths.

Layout: `k`, `v` are [L, B, K, S, H] (layers, batch, kv heads, cache length, head dim): each
head's keys of a row are one contiguous [S, H] matrix, which attention multiplies as it is
stored (a [B, S, K, H] layout is copied into that order by every layer at every decode step,
most of a step's time at batch 8 on CPU). Row b's token at position p lives in slot p, so
positions, masks and RoPE need no bookkeeping beyond `lengths[b]`, the number of slots of row
b that hold real tokens. Slots at or past `lengths[b]` may hold garbage (e.g. a prompt's right
padding); the causal mask never lets a query see them, and decoding overwrites them in order.

A sliding-window model (`ModelConfig.sliding_window` = W) may decode with a ring buffer: a cache
of exactly W slots, where position p lives in slot p % W (`is_ring`). Only the last W positions
are ever visible, so the cache needs W slots however long the generation; a prompt is prefilled
into an ordinary cache and its last W positions moved into a ring by `to_ring`. For positions
below W the two layouts agree, so a W-slot cache is always read as a ring.

With `ModelConfig.kv_cache_dtype="int8"`, `k` and `v` hold int8 values and `k_scale`, `v_scale`
[L, B, K, S] float32 scales: each token's key (and value) of each kv head is quantized on its
own, symmetric round-to-nearest over its H features (scale = max|x| · (1 / 127)), when it is
written; attention reads q · scale. The stacked arrays travel through the model as a tuple,
(k, v) or (k, v, k_scale, v_scale); each layer gets them as a `LayerSlot` with its index, writes
its new tokens into them in place and reads its own layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig

# Logical axes: batch shards like activations (data/fsdp), kv heads over `tensor` where they
# divide, as the model's activations do; layers, slots and head dims stay whole.
KV_AXES = ("layers", "act_batch", "act_kv_heads", "cache_length", "head_dim")
LENGTHS_AXES = ("act_batch",)


SCALE_AXES = KV_AXES[:-1]

Layer = tuple[jax.Array, ...]  # (k, v) or (k, v, k_scale, v_scale), stacked [L, ...] in the model


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # [B] int32: real tokens per row
    k_scale: jax.Array | None = None  # [L, B, K, S] float32 with int8 k, v
    v_scale: jax.Array | None = None

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def arrays(self) -> Layer:
        """The stacked [L, ...] arrays, as the model's layers take them."""
        if self.k_scale is None:
            return (self.k, self.v)
        return (self.k, self.v, self.k_scale, self.v_scale)

    def with_arrays(self, arrays: Layer, lengths: jax.Array) -> KVCache:
        """This cache's kind around new stacked arrays (constrained to the cache's shardings)."""
        axes = (KV_AXES, KV_AXES, SCALE_AXES, SCALE_AXES)
        arrays = tuple(sharding.constrain(x, a) for x, a in zip(arrays, axes, strict=False))
        return KVCache(*arrays[:2], lengths, *arrays[2:])

    def rows(self, index_N: jax.Array, lengths_N: jax.Array) -> KVCache:
        """Rows `index_N` of every layer (e.g. copies of a shared context's row)."""
        return KVCache(*(x[:, index_N] for x in self.arrays[:2]), lengths_N,
                       *(x[:, index_N] for x in self.arrays[2:]))  # fmt: skip

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.arrays)


def init_cache(
    config: ModelConfig, batch: int, max_length: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens, in the model's compute dtype
    (or `dtype`; int8 with scales for `config.kv_cache_dtype="int8"`), constrained to the active
    mesh's shardings when there is one."""
    if not 1 <= max_length <= config.max_seq_len:
        raise ValueError(
            f"cache length {max_length} must be in [1, model.max_seq_len={config.max_seq_len}]"
        )
    shape = (config.num_layers, batch, config.num_kv_heads, max_length, config.head_dim)
    lengths = jnp.zeros((batch,), jnp.int32)
    if config.kv_cache_dtype == "int8" and dtype is None:
        k, v = (sharding.constrain(jnp.zeros(shape, jnp.int8), KV_AXES) for _ in "kv")
        ks, vs = (sharding.constrain(jnp.zeros(shape[:-1], jnp.float32), SCALE_AXES) for _ in "kv")
        return KVCache(k=k, v=v, lengths=lengths, k_scale=ks, v_scale=vs)
    dtype = dtype or config.dtype
    k = sharding.constrain(jnp.zeros(shape, dtype), KV_AXES)
    v = sharding.constrain(jnp.zeros(shape, dtype), KV_AXES)
    return KVCache(k=k, v=v, lengths=lengths)


def is_ring(config: ModelConfig, length: int) -> bool:
    """A cache of `length` slots is a ring buffer: the model's sliding window is that long."""
    return config.sliding_window is not None and length == config.sliding_window


def slot_positions(last_B: jax.Array, length: int, ring: bool) -> jax.Array:
    """[B, S]: the position slot s holds when row b's newest position is last_B[b] (-1 for a
    slot not written yet). Without a ring, slot s holds position s."""
    s_S = jnp.arange(length, dtype=jnp.int32)
    if not ring:
        return jnp.broadcast_to(s_S, (last_B.shape[0], length))
    pos_BS = last_B[:, None] - jnp.mod(last_B[:, None] - s_S[None, :], length)
    return jnp.where(pos_BS >= 0, pos_BS, -1)


def to_ring(cache: KVCache, window: int) -> KVCache:
    """An ordinary cache (slot = position, e.g. after a prefill) as a ring of `window` slots
    holding each row's last `window` positions (slot = position % window)."""
    last_B = cache.lengths - 1
    pos_BW = slot_positions(last_B, window, True)
    index_BW = jnp.clip(pos_BW, 0, cache.max_length - 1)

    def gather(x: jax.Array) -> jax.Array:  # [L, B, K, S, ...] -> [L, B, K, W, ...]
        index = index_BW.reshape((1, index_BW.shape[0], 1, window) + (1,) * (x.ndim - 4))
        return jnp.take_along_axis(x, index, axis=3)

    return cache.with_arrays(tuple(gather(x) for x in cache.arrays), cache.lengths)


def quantize_heads(x_BTKH: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales [B, T, K]): each token's vector of each head on its own."""
    xf = x_BTKH.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) * jnp.float32(1 / 127)
    q = jnp.round(xf / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


class LayerSlot(NamedTuple):
    """Layer `index` of the stacked [L, ...] cache arrays, as one layer reads and writes it.

    A layer writes its new keys and values into the stacked arrays in place and reads its own
    layer where attention needs it: slicing layers out and restacking them would copy the whole
    cache at every decode step.
    """

    arrays: Layer  # stacked [L, B, K, S, ...]
    index: jax.Array | int


def update(
    slot: LayerSlot,
    k_new_BTKH: jax.Array,
    v_new_BTKH: jax.Array,
    start_B: jax.Array,
    ring: bool = False,
) -> LayerSlot:
    """The slot with T new keys/values written at slots start[b] .. start[b]+T-1 of its layer
    (modulo the cache length for a `ring`)."""
    b, t = k_new_BTKH.shape[:2]
    rows_B1 = jnp.arange(b)[:, None]
    slots_BT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :]
    if ring:  # one token per row (the caller checks): its position modulo the ring's length
        slots_BT = jnp.mod(slots_BT, slot.arrays[0].shape[3])

    def write(cache: jax.Array, new: jax.Array) -> jax.Array:
        # One scatter into the stacked arrays (in place), their layout untouched. The slice
        # between the indexed dims puts the indexed ones first: `new` is [B, T, K, ...].
        return cache.at[slot.index, rows_B1, :, slots_BT].set(
            new.astype(cache.dtype), indices_are_sorted=True, unique_indices=True, mode="drop"
        )

    new = (k_new_BTKH, v_new_BTKH)
    if len(slot.arrays) == 4:
        (kq, ks), (vq, vs) = quantize_heads(k_new_BTKH), quantize_heads(v_new_BTKH)
        new = (kq, vq, ks, vs)
    out = tuple(write(c, n) for c, n in zip(slot.arrays, new, strict=True))
    axes = (KV_AXES, KV_AXES, SCALE_AXES, SCALE_AXES)
    out = tuple(sharding.constrain(x, a) for x, a in zip(out, axes, strict=False))
    return LayerSlot(out, slot.index)


def read(slot: LayerSlot, dtype: jnp.dtype | str) -> tuple[jax.Array, jax.Array]:
    """The slot's layer's keys and values [B, K, S, H] in `dtype` (dequantized from int8)."""
    layer = tuple(jax.lax.dynamic_index_in_dim(x, slot.index, 0, False) for x in slot.arrays)
    if len(layer) == 2:
        return layer[0].astype(dtype), layer[1].astype(dtype)
    k, v, ks, vs = layer
    return (
        (k.astype(jnp.float32) * ks[..., None]).astype(dtype),
        (v.astype(jnp.float32) * vs[..., None]).astype(dtype),
    )
