"""Position encodings: RoPE (rotate-half, linear/llama3 scaling), sinusoidal, learned."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.model import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies [H/2] (float64 NumPy, constant-folded into the program)."""
    h = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return inv_freq / factor
    if config.rope_scaling == "llama3":
        old_len = config.rope_original_max_len
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Short wavelengths (high frequencies) are kept, long ones are slowed by `factor`,
        # and wavelengths between old_len/high and old_len/low are interpolated.
        smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotate feature pairs (i, i + H/2) by position * frequency_i (rotate-half convention)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config), jnp.float32)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def sinusoidal(positions_BT: jax.Array, features: int, dtype: str) -> jax.Array:
    """Fixed encodings [B, T, D]: sin at even features, cos at odd, wavelengths up to 10000·2π."""
    inv_freq = 1.0 / 10_000.0 ** (np.arange(0, features, 2, dtype=np.float64) / features)
    angles = (
        positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
    )
    enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return enc.reshape(*positions_BT.shape, features).astype(dtype)


class LearnedPositions(nn.Module):
    """A learned table [max_seq_len, D] indexed by position."""

    config: ModelConfig

    @nn.compact
    def __call__(self, positions_BT: jax.Array) -> jax.Array:
        cfg = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(
                jax.nn.initializers.normal(cfg.init_std), ("positions", "embed")
            ),
            (cfg.max_seq_len, cfg.d_model),
            cfg.param_dtype,
        )
        return jnp.take(table, positions_BT, axis=0).astype(cfg.dtype)
