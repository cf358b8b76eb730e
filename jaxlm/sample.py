"""Sampling. For now: greedy decoding without a KV cache, one compiled loop."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.configs.model import ModelConfig
from jaxlm.model.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("config", "prompt_len"))
def _greedy(config: ModelConfig, params: Any, tokens_1L: jax.Array, prompt_len: int) -> jax.Array:
    length = tokens_1L.shape[1]

    def body(i: int, tokens: jax.Array) -> jax.Array:
        # Positions not yet written are segment 0 (padding), so they never influence position i-1.
        segments = (jnp.arange(length) < i).astype(jnp.int32)[None]
        logits = Transformer(config).apply({"params": params}, tokens, segment_ids_BT=segments)[0]
        next_token = jnp.argmax(logits[0, i - 1]).astype(tokens.dtype)
        return tokens.at[0, i].set(next_token)

    return jax.lax.fori_loop(prompt_len, length, body, tokens_1L)


def greedy_without_cache(
    config: ModelConfig, params: Any, prompt: Sequence[int], max_new_tokens: int
) -> list[int]:
    """`prompt` followed by up to `max_new_tokens` greedy tokens (stopping at max_seq_len).

    Each step reruns the whole sequence through the model (no KV cache), inside one jitted
    `fori_loop`.
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if any(not 0 <= t < config.vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must be in [0, {config.vocab_size})")
    length = min(len(prompt) + max_new_tokens, config.max_seq_len)
    if len(prompt) >= length:
        return list(prompt)[:length]
    tokens = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    return [int(t) for t in _greedy(config, params, tokens, len(prompt))[0]]
