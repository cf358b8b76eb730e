"""Mixture-of-Experts feed-forward block: a router, E gated experts, optional shared experts.

Routing: float32 logits x W_r; scores = softmax (or sigmoid) of the logits; each token picks its
top-k experts, weighted by their scores (renormalised to sum to 1 when `renormalize`).

Two dispatch paths compute the same function:

- "dropless": the N*k (token, expert) assignments are sorted by expert and multiplied with
  `jax.lax.ragged_dot` (one contiguous group of rows per expert); no token is ever dropped.
- "capacity": each expert takes at most C = ceil(capacity_factor * N * k / E) assignments,
  chosen in priority order (every token's first choice before any second choice, then token
  order); the rest are dropped (they add nothing) and counted. Dispatch and combine are einsums
  with one-hot [N, E, C] tensors, which shard cleanly over an expert mesh axis.

Auxiliary outputs (returned, never stored): `moe_lb_loss` = weight * E * sum_e f_e P_e (the
Switch/Mixtral load-balancing loss: f_e the fraction of assignments to e, P_e the mean router
probability of e; 1 * weight when routing is uniform), `moe_z_loss` = weight * mean(logsumexp
(logits)^2), and the metrics `moe_expert_load` [E] (= f), `moe_dropped_fraction`,
`moe_router_entropy`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.configs.model import LoRAConfig, ModelConfig
from jaxlm.model.layers import Einsum, kernel_init
from jaxlm.model.lora import dropout as lora_dropout
from jaxlm.model.lora import expert_adapters
from jaxlm.model.mlp import ACTIVATIONS, MLP
from jaxlm.model.quant import quant_weight
from jaxlm.sharding import constrain


def route(
    logits_NE: jax.Array, top_k: int, score: str, renormalize: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [N, k], expert ids [N, k], router probabilities [N, E]) from float32 logits."""
    if score == "softmax":
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    else:
        probs_NE = jax.nn.sigmoid(logits_NE)
    weights_NK, experts_NK = jax.lax.top_k(probs_NE, top_k)
    if renormalize:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    return weights_NK, experts_NK.astype(jnp.int32), probs_NE


def load_balancing_loss(probs_NE: jax.Array, experts_NK: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e: f_e = share of the N*k assignments that went to e, P_e = mean router
    probability of e (probabilities normalised over experts, also for sigmoid scores)."""
    e = probs_NE.shape[-1]
    f_E = jnp.mean(jax.nn.one_hot(experts_NK, e, dtype=jnp.float32), axis=(0, 1))
    p_NE = probs_NE / jnp.sum(probs_NE, axis=-1, keepdims=True)
    return e * jnp.sum(f_E * jnp.mean(p_NE, axis=0))


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def capacity_dispatch(
    experts_NK: jax.Array, num_experts: int, cap: int
) -> tuple[jax.Array, jax.Array]:
    """(dispatch [N, K, E, C] one-hots of kept assignments, kept [N, K] booleans).

    Priority: all first choices (in token order), then all second choices, and so on.
    """
    n, k = experts_NK.shape
    onehot_KNE = jax.nn.one_hot(experts_NK.T, num_experts, dtype=jnp.int32)
    # Slot of each assignment in its expert's queue: assignments before it in priority order.
    flat = onehot_KNE.reshape(k * n, num_experts)
    position_KNE = (jnp.cumsum(flat, axis=0) - flat).reshape(k, n, num_experts)
    position_KN = jnp.sum(position_KNE * onehot_KNE, axis=-1)
    kept_KN = position_KN < cap
    slot_KNC = jax.nn.one_hot(jnp.where(kept_KN, position_KN, cap), cap, dtype=jnp.float32)
    dispatch_KNEC = onehot_KNE.astype(jnp.float32)[..., None] * slot_KNC[:, :, None, :]
    return jnp.swapaxes(dispatch_KNEC, 0, 1), kept_KN.T


class MoE(nn.Module):
    """The MoE feed-forward block for [B, T, D] inputs. Returns (output, aux dict)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg, moe = self.config, self.config.moe
        b, t, d = x_BTD.shape
        e, k = moe.num_experts, moe.top_k
        f = moe.expert_mlp_dim or cfg.mlp_dim
        dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        x_ND = x_BTD.reshape(b * t, d)

        # Router, in float32 (its softmax decides discrete choices).
        router_x = x_ND.astype(jnp.float32)
        if moe.router_jitter > 0 and self.has_rng("router"):
            noise = jax.random.uniform(
                self.make_rng("router"),
                router_x.shape,
                minval=1.0 - moe.router_jitter,
                maxval=1.0 + moe.router_jitter,
            )
            router_x = router_x * noise
        router = Einsum(
            (d, e),
            ("embed", "expert"),
            kernel_init(cfg, 0, 1),
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
            name="router",
        )
        logits_NE = router("ND,DE->NE", router_x)
        weights_NK, experts_NK, probs_NE = route(logits_NE, k, moe.score, moe.renormalize)

        def param(name: str, shape: tuple[int, ...], axes: tuple[str, ...], out: bool = False):
            init = kernel_init(cfg, 1, 2, output_projection=out)
            return quant_weight(
                self, name, init, shape, axes, (1,), cfg.quant, cfg.param_dtype, cfg.dtype
            )

        w_up_EDF = param("up", (e, d, f), ("expert", "embed", "expert_mlp"))
        w_gate_EDF = (
            param("gate", (e, d, f), ("expert", "embed", "expert_mlp")) if cfg.gated else None
        )
        w_down_EFD = param("down", (e, f, d), ("expert", "expert_mlp", "embed"), out=True)
        act = ACTIVATIONS[cfg.activation]
        xc_ND = x_ND.astype(cfg.dtype)
        lora = cfg.lora if cfg.lora.adapts("experts") else None
        adapters = {}
        if lora is not None:
            for name, shape, axes in (
                ("up", (e, d, f), ("expert", "embed", "expert_mlp")),
                ("gate", (e, d, f), ("expert", "embed", "expert_mlp")),
                ("down", (e, f, d), ("expert", "expert_mlp", "embed")),
            ):
                if name != "gate" or cfg.gated:
                    a, b_ = expert_adapters(self, lora, name, shape, axes)
                    adapters[name] = (a.astype(cfg.dtype), b_.astype(cfg.dtype))

        def grouped(x_AI: jax.Array, w_EIO: jax.Array, name: str, sizes: jax.Array) -> jax.Array:
            y = jax.lax.ragged_dot(x_AI, w_EIO, sizes)
            if name in adapters:  # the token's own expert's adapter
                a, b_ = adapters[name]
                xa = jax.lax.ragged_dot(lora_dropout(self, lora, x_AI), a, sizes)
                y = y + lora.scale * jax.lax.ragged_dot(xa, b_, sizes)
            return y

        def batched(x_ECI: jax.Array, w_EIO: jax.Array, name: str) -> jax.Array:
            y = jnp.einsum("ECI,EIO->ECO", x_ECI, w_EIO)
            if name in adapters:
                a, b_ = adapters[name]
                xa = jnp.einsum("ECI,EIR->ECR", lora_dropout(self, lora, x_ECI), a)
                y = y + lora.scale * jnp.einsum("ECR,ERO->ECO", xa, b_)
            return y

        if moe.dispatch == "dropless":
            flat_experts = experts_NK.reshape(-1)  # assignment a = token a // k, choice a % k
            order = jnp.argsort(flat_experts, stable=True)
            group_sizes_E = jnp.bincount(flat_experts, length=e).astype(jnp.int32)
            x_AD = xc_ND[order // k]
            up_AF = grouped(x_AD, w_up_EDF, "up", group_sizes_E)
            if cfg.gated:
                h_AF = act(grouped(x_AD, w_gate_EDF, "gate", group_sizes_E)) * up_AF
            else:
                h_AF = act(up_AF)
            y_AD = grouped(h_AF, w_down_EFD, "down", group_sizes_E)
            y_NKD = jnp.zeros_like(y_AD).at[order].set(y_AD).reshape(b * t, k, d)
            out_ND = jnp.einsum("NKD,NK->ND", y_NKD, weights_NK.astype(y_NKD.dtype))
            dropped = jnp.zeros((), jnp.float32)
        else:
            cap = capacity(b * t, k, e, moe.capacity_factor)
            dispatch_NKEC, kept_NK = capacity_dispatch(experts_NK, e, cap)
            dispatch_NEC = jnp.sum(dispatch_NKEC, axis=1).astype(cfg.dtype)
            combine_NEC = jnp.einsum("NKEC,NK->NEC", dispatch_NKEC, weights_NK).astype(cfg.dtype)
            dispatch_NEC = constrain(dispatch_NEC, ("act_batch", "act_expert", None))
            x_ECD = jnp.einsum("NEC,ND->ECD", dispatch_NEC, xc_ND)
            x_ECD = constrain(x_ECD, ("act_expert", None, "act_embed"))
            up_ECF = batched(x_ECD, w_up_EDF, "up")
            gate_ECF = batched(x_ECD, w_gate_EDF, "gate") if cfg.gated else None
            h_ECF = act(gate_ECF) * up_ECF if cfg.gated else act(up_ECF)
            y_ECD = batched(h_ECF, w_down_EFD, "down")
            out_ND = jnp.einsum("NEC,ECD->ND", combine_NEC, y_ECD)
            dropped = 1.0 - jnp.mean(kept_NK.astype(jnp.float32))

        out_BTD = out_ND.reshape(b, t, d)
        if moe.num_shared_experts:
            # LoRA targets name the dense MLP's projections; shared experts keep none.
            shared_cfg = dataclasses.replace(
                cfg, mlp_dim=moe.num_shared_experts * f, mlp_bias=False, lora=LoRAConfig()
            )
            shared_BTD = MLP(shared_cfg, name="shared")(x_BTD)
            if moe.shared_expert_gate:
                gate = Einsum(
                    (d, 1), ("embed", None), kernel_init(cfg, 0, 1), name="shared_gate", **dt
                )
                shared_BTD = shared_BTD * jax.nn.sigmoid(gate("BTD,DO->BTO", x_BTD))
            out_BTD = out_BTD + shared_BTD
        out_BTD = constrain(out_BTD.astype(cfg.dtype), ("act_batch", "act_length", "act_embed"))

        entropy = -jnp.mean(
            jnp.sum(jax.nn.softmax(logits_NE) * jax.nn.log_softmax(logits_NE), axis=-1)
        )
        aux = {
            "moe_lb_loss": moe.load_balance_weight * load_balancing_loss(probs_NE, experts_NK),
            "moe_z_loss": moe.router_z_weight * router_z_loss(logits_NE),
            "moe_expert_load": jnp.mean(
                jax.nn.one_hot(experts_NK, e, dtype=jnp.float32), axis=(0, 1)
            ),
            "moe_dropped_fraction": dropped,
            "moe_router_entropy": entropy,
        }
        return out_BTD, aux
