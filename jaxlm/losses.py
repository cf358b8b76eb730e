"""Pure losses: masked next-token cross-entropy (float32, chunked), z-loss, MoE aux terms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Logits of at most this many elements (32 MiB in float32) are taken whole when no chunk size
# is given: their float32 softmax costs less memory than a loop and recomputation cost time.
WHOLE_LOGITS_MAX = 1 << 23
DEFAULT_CHUNK = 128


def _over_chunks(
    fn: Callable[..., Any],
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    mask_BT: jax.Array,
    chunk: int | None,
) -> Any:
    """`fn(logits, targets, mask)` on chunks of `chunk` positions, under `jax.checkpoint` (so
    neither a float32 copy of the logits nor more than one chunk's softmax is ever held, forward
    or backward); outputs stacked as [n chunks, ...]. Padded positions have mask 0.

    `chunk=None`: logits of at most `WHOLE_LOGITS_MAX` elements in one piece, without the loop
    or the recomputation (as one chunk of all positions), larger ones in `DEFAULT_CHUNK`s."""
    b, t, v = logits_BTV.shape
    if chunk is None:
        if b * t * v <= WHOLE_LOGITS_MAX:
            return jax.tree.map(lambda x: x[None], fn(logits_BTV, targets_BT, mask_BT))
        chunk = DEFAULT_CHUNK
    chunk = min(chunk, t)
    pad = -t % chunk
    if pad:
        logits_BTV = jnp.pad(logits_BTV, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    one = jax.checkpoint(lambda args: fn(*args))
    return jax.lax.map(one, (split(logits_BTV), split(targets_BT), split(mask_BT)))


def _target_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logsumexp, the target's logit) per position, in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def cross_entropy_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, chunk: int | None = None
) -> dict[str, jax.Array]:
    """Sums over masked-in tokens of -log p(target) and of logsumexp² (for z-loss), and the count.

    Computed in float32 over chunks of `chunk` positions (see `_over_chunks`), whatever the
    compute dtype of the logits.
    """

    def one(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        lse, target_logit = _target_terms(logits, targets)
        weight = mask.astype(jnp.float32)
        return jnp.sum((lse - target_logit) * weight), jnp.sum(jnp.square(lse) * weight)

    nll, z = _over_chunks(one, logits_BTV, targets_BT, mask_BT, chunk)
    return {"nll": jnp.sum(nll), "z": jnp.sum(z), "count": jnp.sum(mask_BT.astype(jnp.float32))}


def token_log_probs(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, chunk: int | None = None
) -> jax.Array:
    """log p(target) at each position, float32, 0 where `mask` is off ([B, T]; chunked like
    `cross_entropy_sums`)."""
    b, t, _ = logits_BTV.shape

    def one(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
        lse, target_logit = _target_terms(logits, targets)
        return jnp.where(mask, target_logit - lse, 0.0)

    out = _over_chunks(one, logits_BTV, targets_BT, mask_BT, chunk)  # [n, B, chunk]
    return jnp.swapaxes(out, 0, 1).reshape(b, -1)[:, :t]


def token_entropy(logits_BTV: jax.Array, mask_BT: jax.Array, chunk: int | None = None) -> jax.Array:
    """The entropy (nats) of the softmax at each position, float32, 0 where `mask` is off
    ([B, T]; chunked like `cross_entropy_sums`)."""
    b, t, _ = logits_BTV.shape

    def one(logits: jax.Array, _: jax.Array, mask: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.where(mask, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)

    out = _over_chunks(one, logits_BTV, jnp.zeros((b, t), jnp.int32), mask_BT, chunk)
    return jnp.swapaxes(out, 0, 1).reshape(b, -1)[:, :t]


def aux_loss(aux: dict[str, jax.Array]) -> jax.Array:
    """The sum of the model's auxiliary losses (entries named `*_loss`, e.g. MoE balancing)."""
    terms = [jnp.sum(v) for k, v in aux.items() if k.endswith("_loss")]
    return sum(terms, jnp.zeros((), jnp.float32))


MOE_METRICS = (
    "moe_lb_loss",
    "moe_z_loss",
    "moe_dropped_fraction",
    "moe_router_entropy",
    "moe_load_max",
    "moe_load_min",
)


def moe_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step MoE statistics over all MoE layers: the (weighted) aux losses summed, the dropped
    fraction and router entropy averaged, and the most / least loaded expert's share of the
    assignments times E (1 = perfectly balanced)."""
    if "moe_expert_load" not in aux:
        return {}
    load_E = jnp.mean(aux["moe_expert_load"], axis=0)
    e = load_E.shape[-1]
    return {
        "moe_lb_loss": jnp.sum(aux["moe_lb_loss"]),
        "moe_z_loss": jnp.sum(aux["moe_z_loss"]),
        "moe_dropped_fraction": jnp.mean(aux["moe_dropped_fraction"]),
        "moe_router_entropy": jnp.mean(aux["moe_router_entropy"]),
        "moe_load_max": jnp.max(load_E) * e,
        "moe_load_min": jnp.min(load_E) * e,
        "moe_expert_load": load_E,  # [E]: share of the assignments per expert (sums to 1)
    }
