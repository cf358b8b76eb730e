"""Precision: the dtypes a run computes in and keeps its weights in, and dynamic loss scaling.

A run's precision policy is three settings:

| policy | `model.dtype` | `model.param_dtype` | `train.loss_scale` ("auto") |
|---|---|---|---|
| float32 | float32 | float32 | off |
| bfloat16 compute, float32 master weights (the TPU usual) | bfloat16 | float32 | off |
| pure bfloat16 (weights and optimizer state too) | bfloat16 | bfloat16 | off |
| float16 compute, float32 master weights (GPUs without bfloat16) | float16 | float32 | dynamic |

float16 keeps 5 exponent bits: gradients below about 6e-8 flush to zero and above 65504
overflow. Dynamic loss scaling multiplies the objective by a scale S before the backward pass and
the gradients by 1/S after it, in float32 (exact for a power of two), so small gradients survive.
When the gradients come out non-finite while the loss is finite (an overflow), the update is
skipped and S halves (not below 1); after `train.loss_scale_period` finite steps in a row S
doubles (up to `MAX_LOSS_SCALE`). The scaler's state is a small dict in `TrainState.loss_scale`
(None when scaling is off, so a run without it saves the same checkpoint as before), checkpointed
and restored with the rest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.configs.run import MAX_LOSS_SCALE, RunConfig

LossScaleState = dict[str, jax.Array]  # scale (float32), good_steps and overflows (int32)


def uses_loss_scaling(config: RunConfig) -> bool:
    """Whether the run scales its loss: `train.loss_scale`, with "auto" = float16 anywhere."""
    if config.train.loss_scale == "auto":
        return "float16" in (config.model.dtype, config.model.param_dtype)
    return config.train.loss_scale == "dynamic"


def init_loss_scale(config: RunConfig) -> LossScaleState | None:
    """The scaler's step-0 state, or None when the run does not scale its loss."""
    if not uses_loss_scaling(config):
        return None
    return {
        "scale": jnp.asarray(config.train.loss_scale_init, jnp.float32),
        "good_steps": jnp.zeros((), jnp.int32),
        "overflows": jnp.zeros((), jnp.int32),
    }


def unscale(grads: Any, scale: jax.Array) -> Any:
    """`grads` / `scale`, computed in float32 and returned in each gradient's dtype."""
    inverse = 1.0 / scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inverse).astype(g.dtype), grads)


def next_loss_scale(state: LossScaleState, overflow: jax.Array, period: int) -> LossScaleState:
    """The scaler after a step: halved (not below 1) on `overflow`, doubled (not above
    `MAX_LOSS_SCALE`) once `period` steps in a row did not overflow."""
    good = jnp.where(overflow, 0, state["good_steps"] + 1)
    grow = good >= period
    scale = jnp.where(
        overflow,
        jnp.maximum(state["scale"] / 2, 1.0),
        jnp.where(grow, jnp.minimum(state["scale"] * 2, MAX_LOSS_SCALE), state["scale"]),
    )
    return {
        "scale": scale.astype(jnp.float32),
        "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
        "overflows": state["overflows"] + overflow.astype(jnp.int32),
    }


def describe(config: RunConfig) -> str:
    """One line for `jaxlm info`: the compute and weight dtypes and the loss scaling."""
    model = config.model
    if model.dtype == model.param_dtype:
        line = f"{model.dtype} compute and weights"
    else:
        line = f"{model.dtype} compute, {model.param_dtype} weights and optimizer state"
    if uses_loss_scaling(config):
        train = config.train
        return (
            f"{line}; dynamic loss scaling from {train.loss_scale_init:g} (halved on overflow, "
            f"doubled after {train.loss_scale_period} finite steps)"
        )
    return f"{line}; no loss scaling"
