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

Either way a shard builds the mask of each key block it attends over from the true positions
and segment ids of its queries and of those keys (`MaskParts`: packed sequences, causality and
sliding windows), never the whole [T, T] mask; a mask with more terms (a prefix LM's prefix,
prompt-tuning slots) arrives as the shard's dense rows. The ring's backward pass is
FlashAttention's, a second pass around the ring (see `_ring`).

Causal load balancing (`model.context_load_balance`): under a causal mask the shard with the
last positions has C times the work of the first. `Transformer` therefore reorders the sequence
before the blocks and restores the order after them: cut into 2C chunks, shard r holds chunks r
and 2C - 1 - r (`balanced_order`), one early and one late, and every shard sees the same number
of visible (query, key) pairs. Positions and the mask follow the tokens, so the result is the
same; only the work is spread evenly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig
from jaxlm.model.attend import MASK_VALUE, attention_mask, dot_attention, softcap

AXIS = "context"


def size(length: int | None = None) -> int:
    """The context-parallel degree of the current mesh (1 outside one, or without the axis);
    with `length`, 1 also when the shards do not divide a sequence of that many positions
    (e.g. the one-token calls that initialise a model: those run unsplit)."""
    shards = sharding.axis_size(AXIS)
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


class MaskParts(NamedTuple):
    """In place of a dense [B, T, T] mask: `attention_mask(index, index, segment, segment,
    window, causal)` over the whole sequence (both in the blocks' order; the window and
    causality are the model's), which each shard builds block by block where it needs it,
    never whole."""

    index_BT: jax.Array
    segment_BT: jax.Array


# Inside the shard_map a shard's mask is a tuple: its dense rows ([B, Q, T], one array) or
# (query index, query segment [B, Q], key index, key segment [B, T]) with Q = G x T/C.
_Rows = tuple[jax.Array, ...]


def _visible(rows: _Rows, start: jax.Array, length: int, window: int | None, causal: bool):
    """[B, 1, Q, length] booleans: which of keys start .. start + length - 1 each query sees."""
    if len(rows) == 1:
        return jax.lax.dynamic_slice_in_dim(rows[0], start, length, axis=2)[:, None]
    q_index, q_segment, k_index, k_segment = rows
    k_index, k_segment = (
        jax.lax.dynamic_slice_in_dim(x, start, length, axis=1) for x in (k_index, k_segment)
    )
    return attention_mask(q_index, k_index, q_segment, k_segment, window, causal)[:, None]


def _local(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    rows: _Rows,
    cap: float | None,
    strategy: str,
    shards: int,
    window: int | None,
    causal: bool,
) -> jax.Array:
    """One shard's [B, T/C, N, H] outputs: its queries over every key."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    g = n // kv
    # [B, K, G*T, H]: the G query heads of each kv head stacked along the queries; the queries'
    # side of the mask follows.
    q_BKQH = jnp.transpose(q_BTNH.reshape(b, t, kv, g, h), (0, 2, 3, 1, 4)).reshape(b, kv, g * t, h)
    if g > 1 and len(rows) == 1:
        rows = (jnp.tile(rows[0], (1, g, 1)),)
    elif g > 1:
        rows = (jnp.tile(rows[0], (1, g)), jnp.tile(rows[1], (1, g)), *rows[2:])
    if strategy == "all_gather":
        k_all, v_all = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (k_BSKH, v_BSKH))
        mask_BQS = _visible(rows, jnp.zeros((), jnp.int32), k_all.shape[1], window, causal)
        out_BKQH = dot_attention(q_BKQH, k_all, v_all, mask_BQS[:, 0], cap)
    else:
        out_BKQH = _ring(q_BKQH, k_BSKH, v_BSKH, rows, cap, shards, window, causal)
    out_BKGTH = out_BKQH.reshape(b, kv, g, t, h)
    return jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def _ring_blocks(q_BKQH, k_BSKH, rows, source, cap, window, causal):
    """(capped logits, visible, raw logits) of this shard's queries over the key block of shard
    `source`, float32, masked logits at MASK_VALUE."""
    block = k_BSKH.shape[1]
    visible = _visible(rows, source * block, block, window, causal)
    raw = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH, preferred_element_type=jnp.float32)
    return jnp.where(visible, softcap(raw, cap), MASK_VALUE), visible, raw


def _ring_forward(q_BKQH, k_BSKH, v_BSKH, rows, cap, shards, window, causal):
    f32 = jnp.float32
    me = jax.lax.axis_index(AXIS)
    b, kv, q, h = q_BKQH.shape
    top = jnp.full((b, kv, q, 1), MASK_VALUE, f32)  # running max of the logits
    total = jnp.zeros((b, kv, q, 1), f32)  # running sum of exp(logit - top)
    acc = jnp.zeros((b, kv, q, h), f32)  # running sum of exp(logit - top) * v
    forward = [(i, (i + 1) % shards) for i in range(shards)]
    # Unrolled, not a `lax.scan`: as a scan (both passes) the v5e:2x4 step of
    # experiments/bench/context_aot.py took 2.09 GiB of temporaries per chip at C = 4 against
    # 1.65 GiB unrolled (1.55 against 1.48 at C = 8); the program grows with C instead.
    for step in range(shards):
        source = (me - step) % shards
        logits, _, _ = _ring_blocks(q_BKQH, k_BSKH, rows, source, cap, window, causal)
        new_top = jnp.maximum(top, jnp.max(logits, -1, keepdims=True))
        probs = jnp.exp(logits - new_top)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(probs, -1, keepdims=True)
        acc = acc * rescale + jnp.einsum(
            "BKQS,BSKH->BKQH", probs.astype(q_BKQH.dtype), v_BSKH, preferred_element_type=f32
        )
        top = new_top
        if step < shards - 1:  # pass the block on; shard i now holds shard i - step - 1's
            k_BSKH, v_BSKH = jax.lax.ppermute((k_BSKH, v_BSKH), AXIS, forward)
    out_BKQH = (acc / total).astype(q_BKQH.dtype)
    return out_BKQH, top + jnp.log(total)  # and the log-sum-exp of each query's logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring(
    q_BKQH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    rows: _Rows,
    cap: float | None,
    shards: int,
    window: int | None,
    causal: bool,
) -> jax.Array:
    """Online-softmax attention over the key blocks passed around the ring (float32 statistics;
    the probabilities and the output take q's dtype, as in `dot_attention`).

    The backward pass is FlashAttention's, blockwise around the ring a second time: it keeps
    only q, this shard's k and v, the output and each query's log-sum-exp, recomputes each
    block's probabilities, and passes every block's key/value gradients along with the block,
    so they arrive home after C steps. Autodiff would keep every step's [Q, S/C] logits and
    probabilities, in float32: more than the unsplit attention's saved probabilities at C = 2.
    """
    return _ring_forward(q_BKQH, k_BSKH, v_BSKH, rows, cap, shards, window, causal)[0]


def _ring_fwd(q_BKQH, k_BSKH, v_BSKH, rows, cap, shards, window, causal):
    out_BKQH, lse = _ring_forward(q_BKQH, k_BSKH, v_BSKH, rows, cap, shards, window, causal)
    return out_BKQH, (q_BKQH, k_BSKH, v_BSKH, rows, out_BKQH, lse)


def _ring_bwd(cap, shards, window, causal, residuals, dout_BKQH):
    q_BKQH, k_BSKH, v_BSKH, rows, out_BKQH, lse = residuals
    f32 = jnp.float32
    me = jax.lax.axis_index(AXIS)
    # rowsum(P ∘ dP) = rowsum(dO ∘ O), as in `attend`.
    dsum = jnp.sum(dout_BKQH.astype(f32) * out_BKQH.astype(f32), axis=-1, keepdims=True)
    dq = jnp.zeros(q_BKQH.shape, f32)
    dk, dv = jnp.zeros(k_BSKH.shape, f32), jnp.zeros(v_BSKH.shape, f32)
    forward = [(i, (i + 1) % shards) for i in range(shards)]
    for step in range(shards):
        source = (me - step) % shards
        logits, visible, raw = _ring_blocks(q_BKQH, k_BSKH, rows, source, cap, window, causal)
        probs = jnp.exp(logits - lse).astype(q_BKQH.dtype)
        dv = dv + jnp.einsum("BKQS,BKQH->BSKH", probs, dout_BKQH, preferred_element_type=f32)
        dprobs = jnp.einsum("BKQH,BSKH->BKQS", dout_BKQH, v_BSKH, preferred_element_type=f32)
        dlogits = jnp.where(visible, probs.astype(f32) * (dprobs - dsum), 0.0)
        if cap is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh²
            dlogits = dlogits * (1 - jnp.square(softcap(raw, cap) / cap))
        dlogits = dlogits.astype(q_BKQH.dtype)
        dq = dq + jnp.einsum("BKQS,BSKH->BKQH", dlogits, k_BSKH, preferred_element_type=f32)
        dk = dk + jnp.einsum("BKQS,BKQH->BSKH", dlogits, q_BKQH, preferred_element_type=f32)
        # The block's gradients travel with it; after C passes they are back on their shard.
        if step < shards - 1:
            k_BSKH, v_BSKH, dk, dv = jax.lax.ppermute((k_BSKH, v_BSKH, dk, dv), AXIS, forward)
        else:
            dk, dv = jax.lax.ppermute((dk, dv), AXIS, forward)
    return dq.astype(q_BKQH.dtype), dk.astype(k_BSKH.dtype), dv.astype(v_BSKH.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def context_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array | MaskParts,
    cap: float | None,
    strategy: str,
    window: int | None = None,
    causal: bool = True,
) -> jax.Array:
    """[B, T, N, H] self-attention outputs (queries already scaled) with the sequence split over
    the current mesh's `context` axis, by `strategy` ("ring" or "all_gather"); `mask_BTS` is
    the whole [B, T, T] mask in the blocks' order, or the `MaskParts` it is built from with the
    sliding `window` and `causal` (which a dense mask already holds)."""
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
    if isinstance(mask_BTS, MaskParts):
        # Each shard's own positions for its queries, every position for the keys ([B, T] ints).
        index, segment = mask_BTS
        own, every = PartitionSpec(q_spec[0], AXIS), PartitionSpec(q_spec[0], None)
        rows, rows_spec = (index, segment, index, segment), (own, own, every, every)
    else:
        rows, rows_spec = (mask_BTS,), (PartitionSpec(q_spec[0], AXIS, None),)
    run = functools.partial(
        _local, cap=cap, strategy=strategy, shards=shards, window=window, causal=causal
    )
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, rows_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q_BTNH, k_BSKH, v_BSKH, rows)


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
