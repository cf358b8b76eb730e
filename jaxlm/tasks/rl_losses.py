"""The pure pieces of online RL (`jaxlm.tasks.rl`): advantages and the clipped objectives.

Shapes: B rows (one sampled reply each), T positions of the packed row [prompt, reply, pad];
`mask_BT` marks the positions whose *target* is a reply token (the actions). Everything is
float32 and masked, so padded rows and positions contribute exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) by generalised advantage estimation (Schulman et al., 2016) over
    each row's actions: δ_t = r_t + γ V_{t+1} − V_t (V = 0 after the last action),
    A_t = δ_t + γλ A_{t+1}; returns = A + V. Zero off the mask."""
    m = mask_BT.astype(jnp.float32)
    r, v = rewards_BT * m, values_BT * m
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
    next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
    delta = r + gamma * next_v * next_m - v

    def back(carry: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        d, nm, mm = xs
        a = (d + gamma * lam * nm * carry) * mm
        return a, a

    _, adv = jax.lax.scan(
        back, jnp.zeros(r.shape[0], jnp.float32), (delta.T, next_m.T, m.T), reverse=True
    )
    adv = adv.T
    return adv, (adv + v) * m


def whiten(x_BT: jax.Array, mask_BT: jax.Array, eps: float = 1e-8) -> jax.Array:
    """`x` shifted and scaled to mean 0 and standard deviation 1 over the masked positions."""
    m = mask_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x_BT * m) / n
    var = jnp.sum(jnp.square(x_BT - mean) * m) / n
    return (x_BT - mean) * jax.lax.rsqrt(var + eps) * m


def group_advantages(
    rewards_B: jax.Array, valid_B: jax.Array, group: int, eps: float = 1e-4
) -> jax.Array:
    """GRPO's advantages (Shao et al., 2024): each reply's reward less the mean of its group's
    (`group` consecutive rows), over the group's standard deviation (population; + `eps`).
    A group whose replies all score the same gets zero; invalid rows get zero."""
    r = jnp.where(valid_B, rewards_B, 0.0).reshape(-1, group)
    w = valid_B.astype(jnp.float32).reshape(-1, group)
    n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(r * w, axis=1, keepdims=True) / n
    std = jnp.sqrt(jnp.sum(jnp.square(r - mean) * w, axis=1, keepdims=True) / n)
    return ((r - mean) / (std + eps) * w).reshape(-1)


def clipped_policy_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    adv_BT: jax.Array,
    mask_BT: jax.Array,
    clip_eps: float,
) -> dict[str, jax.Array]:
    """Sums over the actions of PPO's clipped surrogate −min(ρA, clip(ρ, 1 ± ε)A) with
    ρ = π/π_old ("policy_loss"), of the actions whose ratio is outside 1 ± ε ("clipped") and
    of the estimate (ρ − 1) − log ρ of KL(π_old ‖ π) ("approx_kl")."""
    m = mask_BT.astype(jnp.float32)
    log_ratio = (logp_BT - old_logp_BT) * m
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * adv_BT, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv_BT)
    return {
        "policy_loss": -jnp.sum(surrogate * m),
        "clipped": jnp.sum((jnp.abs(ratio - 1.0) > clip_eps) * m),
        "approx_kl": jnp.sum(((ratio - 1.0) - log_ratio) * m),
    }


def clipped_value_loss(
    values_BT: jax.Array,
    old_values_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    clip: float,
) -> jax.Array:
    """The sum over the actions of ½ max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V −
    V_old, ±clip): the value loss of PPO's reference implementation."""
    m = mask_BT.astype(jnp.float32)
    clipped = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
    err = jnp.maximum(jnp.square(values_BT - returns_BT), jnp.square(clipped - returns_BT))
    return 0.5 * jnp.sum(err * m)


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-action estimates exp(d) − d − 1, d = log π_ref − log π, of KL(π ‖ π_ref): never
    negative, and unbiased for actions sampled from π (Schulman's k3; GRPO's KL term, whose
    actions come from the rollout's policy). Zero off the mask."""
    d = (ref_logp_BT - logp_BT) * mask_BT
    return (jnp.exp(d) - d - 1.0) * mask_BT
