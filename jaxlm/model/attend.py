"""The attention core, softmax(mask(cap(q kᵀ))) v, with a hand-written backward pass, and a
causal form that skips the key block every query before it cannot see.

Autodiff of the core keeps the masked logits and the unnormalised softmax and runs the softmax
backward over [B, K, Q, S] several times; the backward here is the one FlashAttention uses
(dS = P ∘ (dP - rowsum(dO ∘ O))), which needs only the probabilities and the output. On the
2-core CPU that is 1.6x faster for the core (forward + backward), and splitting causal queries
into two halves, the first of which attends over only the first half of the keys, saves a
quarter of the [T, T] work: together the core runs in about half the time (42-44 -> 22-24 ms
at the matched shape of `experiments/bench/train_step.py`, whose whole step went 0.62 -> 0.52 s).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

# Masked logits get this instead of -inf, so a row with nothing visible gives a finite softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Causal self-attention over at least this many positions (and an even number) runs as two
# query blocks; below it the slicing costs more than the skipped block saves.
CAUSAL_BLOCKS_MIN_LENGTH = 128
# Queries per kv head up to which the logits are computed keys-first (decoding; see
# `_capped_logits`).
FEW_QUERIES = 8


def attention_mask(
    q_index_BT: jax.Array,
    k_index_BS: jax.Array,
    q_segment_BT: jax.Array,
    k_segment_BS: jax.Array,
    sliding_window: int | None,
    causal: bool = True,
) -> jax.Array:
    """[B, T, S] booleans: key s is visible to query t.

    Visible means in the same segment (packed sequences; segment 0 is padding and sees only
    padding), causal (k_index <= q_index) unless `causal=False` (bidirectional), and, with a
    window W, q_index - k_index < W (|q_index - k_index| < W when bidirectional).
    """
    q = q_index_BT[:, :, None]
    k = k_index_BS[:, None, :]
    mask = q_segment_BT[:, :, None] == k_segment_BS[:, None, :]
    if causal:
        mask &= k <= q
    if sliding_window is not None:
        mask &= jnp.abs(q - k) < sliding_window
    return mask


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): a smooth bound on |x| (Gemma 2); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def _capped_logits(q_BKQH: jax.Array, k_BSKH: jax.Array, cap: float | None) -> jax.Array:
    if q_BKQH.shape[2] <= FEW_QUERIES:
        # Decoding: keys as the matrix and the few queries as vectors, so XLA:CPU reads each
        # head's [S, H] keys as stored; the other way round it first copies them transposed
        # at every layer of every step (batch-1 decode went from about 1.0x to 1.1-1.4x the
        # benchmark's minimal reference in most runs). The [S, Q] result is small to swap.
        logits_BKSQ = jnp.einsum(
            "BSKH,BKQH->BKSQ", k_BSKH, q_BKQH, preferred_element_type=jnp.float32
        )
        return softcap(jnp.swapaxes(logits_BKSQ, 2, 3), cap)
    logits_BKQS = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH, preferred_element_type=jnp.float32)
    return softcap(logits_BKQS, cap)


def _forward(q_BKQH, k_BSKH, v_BSKH, mask_BQS, cap):
    logits_BKQS = jnp.where(mask_BQS[:, None], _capped_logits(q_BKQH, k_BSKH, cap), MASK_VALUE)
    probs_BKQS = jax.nn.softmax(logits_BKQS, axis=-1).astype(q_BKQH.dtype)
    return jnp.einsum("BKQS,BSKH->BKQH", probs_BKQS, v_BSKH), probs_BKQS


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def dot_attention(
    q_BKQH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BQS: jax.Array,
    cap: float | None = None,
) -> jax.Array:
    """[B, K, Q, H] outputs of Q queries (already scaled) over S keys for each of K kv heads.

    `mask_BQS` (booleans): key s is visible to query q. The logits are float32, soft-capped by
    `cap` (None: no cap) before masking; the probabilities and the output take q's dtype.
    """
    return _forward(q_BKQH, k_BSKH, v_BSKH, mask_BQS, cap)[0]


def _fwd(q_BKQH, k_BSKH, v_BSKH, mask_BQS, cap):
    out_BKQH, probs_BKQS = _forward(q_BKQH, k_BSKH, v_BSKH, mask_BQS, cap)
    return out_BKQH, (q_BKQH, k_BSKH, v_BSKH, mask_BQS, probs_BKQS, out_BKQH)


def _bwd(cap, residuals, dout_BKQH):
    q_BKQH, k_BSKH, v_BSKH, mask_BQS, probs_BKQS, out_BKQH = residuals
    f32 = jnp.float32
    dv_BSKH = jnp.einsum("BKQS,BKQH->BSKH", probs_BKQS, dout_BKQH, preferred_element_type=f32)
    dprobs_BKQS = jnp.einsum("BKQH,BSKH->BKQS", dout_BKQH, v_BSKH, preferred_element_type=f32)
    # rowsum(P ∘ dP) = rowsum(dO ∘ O), an H-wide sum instead of an S-wide one.
    dsum_BKQ1 = jnp.sum(dout_BKQH.astype(f32) * out_BKQH.astype(f32), axis=-1, keepdims=True)
    dlogits_BKQS = probs_BKQS.astype(f32) * (dprobs_BKQS - dsum_BKQ1)
    dlogits_BKQS = jnp.where(mask_BQS[:, None], dlogits_BKQS, 0.0)
    if cap is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh², recomputed from q and k
        dlogits_BKQS = dlogits_BKQS * (1 - jnp.square(_capped_logits(q_BKQH, k_BSKH, cap) / cap))
    dlogits_BKQS = dlogits_BKQS.astype(q_BKQH.dtype)
    dq_BKQH = jnp.einsum("BKQS,BSKH->BKQH", dlogits_BKQS, k_BSKH, preferred_element_type=f32)
    dk_BSKH = jnp.einsum("BKQS,BKQH->BSKH", dlogits_BKQS, q_BKQH, preferred_element_type=f32)
    return (
        dq_BKQH.astype(q_BKQH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        None,
    )


dot_attention.defvjp(_fwd, _bwd)


def attend(
    q_BKGTH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_BTS: jax.Array,
    cap: float | None = None,
    causal: bool = False,
) -> jax.Array:
    """[B, K, G, T, H] outputs: the G query heads sharing each kv head, over the S keys.

    The G heads are stacked along the query axis of one `dot_attention` (plain batched matmuls
    over (B, K): on CPU, XLA runs the 5-D [B, K, G, T, S] form about 2x slower, even at G=1).
    `causal=True` promises that the mask hides every key after its query (S = T, key s hidden
    from query t whenever s > t, as in self-attention without a cache): then, for an even T of
    at least `CAUSAL_BLOCKS_MIN_LENGTH`, the first half of the queries attends over only the
    first half of the keys.
    """
    b, k, g, t, h = q_BKGTH.shape
    blocks = 2 if causal and t % 2 == 0 and t >= CAUSAL_BLOCKS_MIN_LENGTH else 1
    c = t // blocks
    outs = []
    for i in range(blocks):
        s = k_BSKH.shape[1] if blocks == 1 else (i + 1) * c
        mask_BCS = mask_BTS[:, i * c : (i + 1) * c, :s]
        mask_BQS = jnp.tile(mask_BCS, (1, g, 1)) if g > 1 else mask_BCS
        q_BKQH = q_BKGTH[:, :, :, i * c : (i + 1) * c].reshape(b, k, g * c, h)
        out_BKQH = dot_attention(q_BKQH, k_BSKH[:, :s], v_BSKH[:, :s], mask_BQS, cap)
        outs.append(out_BKQH.reshape(b, k, g, c, h))
    return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
