"""Optax optimizers and learning-rate schedules from `OptimConfig`; weight-decay masks by path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlm.configs.run import OptimConfig


def schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the named decay (all closed forms, step-indexed).

    The decay spans `config.schedule_steps` when it is set, else `total_steps`.
    """
    total_steps = config.schedule_steps or total_steps
    peak, warmup = config.learning_rate, config.warmup_steps
    floor = peak * config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)

    def lr(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)  # progress after warmup
        if config.schedule == "constant":
            after = jnp.full_like(step, peak)
        elif config.schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * t))
        elif config.schedule == "linear":
            after = peak + (floor - peak) * t
        elif config.schedule == "wsd":
            start = total_steps - config.decay_fraction * total_steps
            d = jnp.clip((step - start) / (total_steps - start), 0.0, 1.0)
            shape = d if config.wsd_decay == "linear" else jnp.sqrt(d)
            after = peak + (floor - peak) * shape
        else:  # inverse_sqrt
            after = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
        return jnp.where(step < warmup, warm, after)

    return lr


def path_name(path: tuple) -> str:
    """'/'-joined dict keys of a pytree path (box attributes like `.value` are skipped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: not norms, biases or embedding tables."""

    def decays(path: tuple, _: Any) -> bool:
        name = path_name(path)
        return not ("norm" in name or name.endswith("/b") or name.endswith("embedding"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    config: OptimConfig,
    total_steps: int,
    updates_per_step: int = 1,
    lr_multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """Clipping (global norm) followed by AdamW, Adafactor or Lion with the schedule.

    `updates_per_step` > 1 (several updates on one batch, as PPO's epochs on one rollout): the
    schedule still follows the training step, the same for each of its updates.
    `lr_multipliers` ('/'-joined parameter path -> factor, e.g. muP's from
    `jaxlm.model.mup.lr_multipliers`) scale those parameters' updates, weight decay included, as
    a per-parameter learning rate would."""
    by_step = schedule(config, total_steps)
    lr = by_step if updates_per_step == 1 else (lambda count: by_step(count // updates_per_step))
    if config.name == "adamw":
        opt = optax.adamw(
            lr,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    elif config.name == "lion":
        opt = optax.lion(
            lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
        )
    else:
        opt = optax.adafactor(
            lr,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    chain = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    chain.append(opt)
    if lr_multipliers:
        chain.append(scale_by_path(lr_multipliers))
    return optax.chain(*chain)


def scale_by_path(factors: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each update by its parameter path's factor (default 1); stateless."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def scale(path: tuple, u: jax.Array) -> jax.Array:
            f = factors.get(path_name(path), 1.0)
            return u if f == 1.0 else u * jnp.asarray(f, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
