"""Context parallelism: one sequence split over the `context` mesh axis.

With `mesh.context = C > 1` every activation's length axis (`act_length`) is split in C
contiguous shards, so each chip holds T/C positions of every row. Everything but attention is
per position and needs no communication. Attention needs every key a query may see, in one of
two ways (`model.context_attention`):

- "all_gather": each shard gathers the keys and values of the whole sequence (an all-gather over
  `context`) and attends its T/C queries over all T keys. Simple, and the fewest steps, but every
  shard holds [T] keys and values and a [T/C, T] block of scores.
- "ring": the shards form a ring; at each of C steps a shard attends its queries over the key
  block it holds, folds the result into an online softmax (running max, sum and output, as
  FlashAttention does), and passes the block on (`ppermute`). No shard ever holds more than one
  block of keys; the exchange of the next block can overlap the current block's matmuls.

Either way a shard keeps its own rows of the [B, T, T] mask (built from the true positions and
segment ids, so packed sequences, sliding windows, prefixes and prompt slots all hold), and
the backward pass is autodiff's: the transpose of a `ppermute` is the `ppermute` back.

Causal load balancing (`model.context_load_balance`): under a causal mask the shard with the
last positions has C times the work of the first. `Transformer` therefore reorders the sequence
before the blocks and restores the order after them: cut into 2C chunks, shard r holds chunks r
and 2C - 1 - r (`balanced_order`), one early and one late, and every shard sees the same number
of visible (query, key) pairs. Positions and the mask follow the tokens, so the result is the
same; only the work is spread evenly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig
from jaxlm.model.attend import MASK_VALUE, dot_attention, softcap

AXIS = "context"


def size(length: int | None = None) -> int:
    """The context-parallel degree of the current mesh (1 outside one, or without the axis);
    with `length`, 1 also when the shards do not divide a sequence of that many positions
    (e.g. the one-token calls that initialise a model: those run unsplit)."""
    ctx = sharding.current()
    shards = 1 if ctx is None else int(dict(ctx[0].shape).get(AXIS, 1))
    return 1 if length is not None and length % shards else shards


def balanced_order(length: int, shards: int) -> np.ndarray:
    """The slot order that gives each of `shards` contiguous shards one early and one late
    chunk: `length` cut into 2 * shards chunks; shard r holds chunks r and 2 * shards - 1 - r.
    order[i] is the original position in slot i."""
    if length % (2 * shards):
        raise ValueError(
            f"causal load balancing cuts the sequence into 2 x {shards} chunks, which do not "
            f"divide {length} positions"
        )
    chunks = np.arange(length).reshape(2 * shards, length // (2 * shards))
    return np.concatenate([np.concatenate([chunks[r], chunks[-1 - r]]) for r in range(shards)])


def _local(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    cap: float | None,
    strategy: str,
    shards: int,
) -> jax.Array:
    """One shard's [B, T/C, N, H] outputs: its queries and mask rows over every key."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    g = n // kv
    # [B, K, G*T, H]: the G query heads of each kv head stacked along the queries.
    q_BKQH = jnp.transpose(q_BTNH.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
    mask_BQS = jnp.tile(mask_BTS, (1, g, 1)) if g > 1 else mask_BTS

    if strategy == "all_gather":
        k_all, v_all = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (k_BSKH, v_BSKH))
        out_BKQH = dot_attention(q_BKQH, k_all, v_all, mask_BQS, cap)
    else:
        out_BKQH = _ring(q_BKQH, k_BSKH, v_BSKH, mask_BQS, cap, shards)
    out_BKGTH = out_BKQH.reshape(b, kv, g, t, h)
    return jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def _ring(
    q_BKQH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BQS: jax.Array,
    cap: float | None,
    shards: int,
) -> jax.Array:
    """Online-softmax attention over the key blocks passed around the ring (float32 statistics;
    the probabilities and the output take q's dtype, as in `dot_attention`)."""
    f32 = jnp.float32
    me = jax.lax.axis_index(AXIS)
    block = k_BSKH.shape[1]
    b, kv, q, h = q_BKQH.shape
    top = jnp.full((b, kv, q, 1), MASK_VALUE, f32)  # running max of the logits
    total = jnp.zeros((b, kv, q, 1), f32)  # running sum of exp(logit - top)
    acc = jnp.zeros((b, kv, q, h), f32)  # running sum of exp(logit - top) * v
    forward = [(i, (i + 1) % shards) for i in range(shards)]
    for step in range(shards):
        source = (me - step) % shards  # the shard whose keys this one holds now
        visible_BQS = jax.lax.dynamic_slice_in_dim(mask_BQS, source * block, block, axis=2)
        logits = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH, preferred_element_type=f32)
        logits = jnp.where(visible_BQS[:, None], softcap(logits, cap), MASK_VALUE)
        # The result does not depend on the running max, only its rounding does: no gradient.
        new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(logits, -1, keepdims=True)))
        probs = jnp.exp(logits - new_top)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(probs, -1, keepdims=True)
        acc = acc * rescale + jnp.einsum(
            "BKQS,BSKH->BKQH", probs.astype(q_BKQH.dtype), v_BSKH, preferred_element_type=f32
        )
        top = new_top
        if step < shards - 1:
            k_BSKH, v_BSKH = jax.lax.ppermute((k_BSKH, v_BSKH), AXIS, forward)
    return (acc / total).astype(q_BKQH.dtype)


def context_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    cap: float | None,
    strategy: str,
) -> jax.Array:
    """[B, T, N, H] self-attention outputs (queries already scaled) with the sequence split over
    the current mesh's `context` axis, by `strategy` ("ring" or "all_gather"); `mask_BTS` is
    the whole [B, T, T] mask in the slots' order."""
    mesh, rules = sharding.current()
    shards = size()
    n, kv = q_BTNH.shape[2], k_BSKH.shape[2]
    spec = functools.partial(sharding.logical_to_spec, mesh=mesh, rules=rules)
    q_spec = spec(("act_batch", "act_length", "act_heads", "head_dim"), q_BTNH.shape)
    kv_spec = spec(("act_batch", "act_length", "act_kv_heads", "head_dim"), k_BSKH.shape)
    if q_spec[1] != AXIS or kv_spec[1] != AXIS:
        raise ValueError(
            f"context parallelism splits the sequence over {AXIS!r}, but the rules give "
            f"queries {q_spec} and keys {kv_spec} for {q_BTNH.shape[1]} positions on "
            f"mesh.context={shards}"
        )
    if kv_spec[2] != q_spec[2]:
        # The kv heads split differently from the query heads (fewer kv heads than the tensor
        # axis): give every query head its own copy, split like the queries.
        k_BSKH, v_BSKH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BSKH, v_BSKH))
        kv_spec = q_spec
    mask_spec = PartitionSpec(q_spec[0], AXIS, None)
    run = functools.partial(_local, cap=cap, strategy=strategy, shards=shards)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, mask_BTS)


def check(config: ModelConfig, seq_len: int, shards: int) -> None:
    """Refuse a context split that cannot work for training sequences of `seq_len` tokens on
    `shards` context shards, before anything is compiled."""
    if shards == 1:
        return
    if config.attention_impl in ("splash", "cudnn"):
        raise ValueError(
            f"model.attention_impl={config.attention_impl!r} attends over a whole sequence on "
            f"one chip, but mesh.context={shards} splits it; use attention_impl='auto' or 'xla' "
            f"(with context parallelism attention runs as model.context_attention="
            f"{config.context_attention!r})"
        )
    length = seq_len + config.prompt_tokens
    balanced = config.causal and config.context_load_balance
    chunks = 2 * shards if balanced else shards
    if length % chunks:
        what = "data.seq_len" + " + model.prompt_tokens" * bool(config.prompt_tokens)
        why = (
            "causal load balancing cuts it into 2 chunks per shard"
            if balanced
            else "one part per shard"
        )
        lower = length // chunks * chunks or chunks
        hint = " (or set model.context_load_balance=False)" if balanced else ""
        raise ValueError(
            f"{what}={length} must be a multiple of {chunks} with mesh.context={shards} "
            f"({why}); the nearest are {lower} and {lower + chunks}{hint}"
        )
