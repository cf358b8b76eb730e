"""The device side of continuous batching: a KV cache of `slots` rows, one compiled decode step
for all of them, and a compiled insert that prefills one request into a free row.

Each row samples with its own settings (temperature, top-k, top-p) and its own key: row b's
token number i is drawn with `fold_in(key_b, i)` from the same filtered logits `sample.generate`
computes, so a request gets the tokens `generate` gives it alone, whatever else is in the batch.
The prompt is prefilled with the shapes `generate` would use for it (its bucket and cache
length), then copied into its row of the shared cache. A sliding-window model's shared cache is
a ring buffer of its window (see `kv_cache`), however long the context.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.configs.model import ModelConfig
from jaxlm.model.kv_cache import KVCache, init_cache
from jaxlm.sample import _NEG, decode_step, nucleus, prefill_cache


def _top_k(logits_BV: jax.Array, k_B: jax.Array) -> jax.Array:
    """Keep each row's k_B[b] most likely tokens (ties kept; k = 0 keeps all), as `TopK`."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    index_B1 = jnp.clip(k_B - 1, 0, logits_BV.shape[-1] - 1)[:, None]
    kth_B1 = jnp.take_along_axis(sorted_BV, index_B1, axis=-1)
    return jnp.where((k_B[:, None] == 0) | (logits_BV >= kth_B1), logits_BV, _NEG)


def _top_p(logits_BV: jax.Array, p_B: jax.Array) -> jax.Array:
    """Nucleus filtering with each row's p_B[b] (p = 1 keeps all), as `TopP`."""
    return jnp.where(p_B[:, None] < 1, nucleus(logits_BV, p_B[:, None]), logits_BV)


def sample_rows(
    logits_BV: jax.Array,
    keys_B: jax.Array,
    counts_B: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
) -> jax.Array:
    """One token per row [B] (int32), row b drawn with `fold_in(keys_B[b], counts_B[b])` from
    its logits after temperature, top-k and top-p (temperature 0: the argmax)."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    safe_t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
    scaled_BV = logits_BV / safe_t_B[:, None]
    scaled_BV = jax.lax.cond(
        jnp.any(top_k_B > 0), lambda x: _top_k(x, top_k_B), lambda x: x, scaled_BV
    )
    scaled_BV = jax.lax.cond(
        jnp.any(top_p_B < 1), lambda x: _top_p(x, top_p_B), lambda x: x, scaled_BV
    )

    def draw(key: jax.Array, count: jax.Array, row_V: jax.Array) -> jax.Array:
        # A [1, V] draw, as `generate` makes for a batch of one.
        return jax.random.categorical(jax.random.fold_in(key, count), row_V[None])[0]

    drawn_B = jax.vmap(draw)(keys_B, counts_B, scaled_BV).astype(jnp.int32)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B)


@functools.partial(jax.jit, static_argnames=("config", "slots", "length"))
def empty_cache(*, config: ModelConfig, slots: int, length: int) -> KVCache:
    """The shared cache: `slots` rows of `length` positions, all free (length 0)."""
    return init_cache(config, slots, length)


@functools.partial(jax.jit, static_argnames=("config", "cache_len"), donate_argnums=(1,))
def insert(
    params: Any,
    cache: KVCache,
    slot: jax.Array,
    prompt_1T: jax.Array,
    length_1: jax.Array,
    key_data: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    config: ModelConfig,
    cache_len: int,
) -> tuple[jax.Array, KVCache]:
    """Prefill one prompt ([1, T], right-padded to a bucket) into a cache of `cache_len` rows,
    sample its first token (count 0) and copy its keys and values into row `slot` of `cache`:
    (first token (scalar int32), the shared cache)."""
    logits_1V, own = prefill_cache(config, params, prompt_1T, length_1, cache_len)
    first = sample_rows(
        logits_1V,
        jax.random.wrap_key_data(key_data[None]),
        jnp.zeros((1,), jnp.int32),
        temperature[None],
        top_k[None],
        top_p[None],
    )[0]
    start = (0, slot) + (0,) * 3
    arrays = tuple(
        jax.lax.dynamic_update_slice(big, small, start[: big.ndim])
        for big, small in zip(cache.arrays, own.arrays, strict=True)
    )
    lengths = cache.lengths.at[slot].set(own.lengths[0])
    return first, cache.with_arrays(arrays, lengths)


@functools.partial(jax.jit, static_argnames=("config", "steps"), donate_argnums=(1,))
def step(
    params: Any,
    cache: KVCache,
    tokens_B: jax.Array,
    active_B: jax.Array,
    key_data_B: jax.Array,
    counts_B: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
    *,
    config: ModelConfig,
    steps: int = 1,
) -> tuple[jax.Array, KVCache]:
    """`steps` decode steps for every row: feed `tokens_B`, sample the next token of each row
    (token number counts_B[b], then the next ones), feed it back: ([steps, B] tokens, cache).
    Free rows (`active_B` false) stay at length 0; a row that stops partway keeps decoding
    until the call ends, and the caller drops those tokens."""
    keys_B = jax.random.wrap_key_data(key_data_B)

    def one(carry, i):
        tokens_B, cache = carry
        logits_BV, cache = decode_step(config, params, tokens_B, cache)
        cache = cache.replace(lengths=jnp.where(active_B, cache.lengths, 0))
        next_B = sample_rows(logits_BV, keys_B, counts_B + i, temperature_B, top_k_B, top_p_B)
        return (next_B, cache), next_B

    (_, cache), tokens_NB = jax.lax.scan(one, (tokens_B, cache), jnp.arange(steps))
    return tokens_NB, cache
