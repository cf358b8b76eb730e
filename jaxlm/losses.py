"""Pure losses: masked next-token cross-entropy (float32, chunked), z-loss, MoE aux terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, chunk: int = 128
) -> dict[str, jax.Array]:
    """Sums over masked-in tokens of -log p(target) and of logsumexp² (for z-loss), and the count.

    Computed in float32 over chunks of `chunk` positions under `jax.checkpoint`, so neither the
    float32 copy of the logits nor the softmax of more than one chunk is ever held (forward or
    backward), whatever the compute dtype of the logits.
    """
    b, t, _ = logits_BTV.shape
    chunk = min(chunk, t)
    pad = -t % chunk
    if pad:
        logits_BTV = jnp.pad(logits_BTV, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits, targets, mask = args
        logits = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        weight = mask.astype(jnp.float32)
        return jnp.sum((lse - target_logit) * weight), jnp.sum(jnp.square(lse) * weight)

    nll, z = jax.lax.map(one, (split(logits_BTV), split(targets_BT), split(mask_BT)))
    return {"nll": jnp.sum(nll), "z": jnp.sum(z), "count": jnp.sum(mask_BT.astype(jnp.float32))}


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
