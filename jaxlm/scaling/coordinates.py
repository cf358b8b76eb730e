"""The muP coordinate check (Yang et al. 2022, section 7 / appendix D): train the same model at
several widths for a few steps and compare the size of each layer's output coordinates, and of
their change since initialisation, across widths. Under muP both stay flat as the width grows;
under standard parametrization with Adam the updates (and the logits) grow with the width."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.overrides import apply_overrides
from jaxlm.configs.run import RunConfig
from jaxlm.model import mup
from jaxlm.model.layers import Embed
from jaxlm.model.transformer import Block, Transformer, init_params
from jaxlm.optim import make_optimizer
from jaxlm.step import step_zero, train_step
from jaxlm.tasks import get_task


def _batch(config: RunConfig, seed: int) -> dict[str, jax.Array]:
    """One fixed LM batch of Zipf-distributed tokens (something to learn: their frequencies)."""
    b, t, v = config.data.batch_size, config.data.seq_len, config.model.vocab_size
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, v + 1)
    tokens = rng.choice(v, size=(b, t + 1), p=p / p.sum()).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "mask": jnp.ones((b, t), jnp.bool_),
        "target_bytes": jnp.full((b,), t, jnp.int32),
    }


def _captured(model: Transformer, params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
    """Outputs of the embedding, each block and the head on `tokens`."""

    def keep(module: nn.Module, method: str) -> bool:
        return method == "__call__" and isinstance(module, (Embed, Block))

    (logits, _, _), state = model.apply(
        {"params": params}, tokens, capture_intermediates=keep, mutable=["intermediates"]
    )
    found = state["intermediates"]
    out = {"embed": found["embed"]["__call__"][0]}
    for i in range(model.config.num_layers):
        out[f"block_{i}"] = found[f"layers_{i}"]["__call__"][0][0]  # (x, (aux, cache))
    out["logits"] = logits
    return out


def coord_check(
    config: RunConfig, widths: Sequence[int], steps: int = 4, *, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows {width, step, layer, size, update} for each width (`model.d_model`, with the fields
    derived from it re-derived), each step 0..`steps` of `config`'s optimizer on one fixed
    batch, and each layer ("embed", "block_i", "logits"): `size` = mean |x| of the layer's
    output on that batch, `update` = mean |x - x at step 0|.

    Layers are unrolled (`scan_layers=False`) to see each block; everything else is `config`'s:
    `model.parametrization` and `mup_base_width` decide what is compared.
    """
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths={list(widths)!r} must be two or more integers >= 1")
    rows = []
    for width in widths:
        cfg = apply_overrides(config, [f"model.d_model={width}"])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
        model, task = Transformer(cfg.model), get_task(cfg)
        tx = make_optimizer(cfg.optim, cfg.train.steps, 1, mup.lr_multipliers(cfg.model))
        key = jax.random.key(seed)
        state = step_zero(init_params(cfg.model, key), tx, task, key)
        batch = _batch(cfg, seed)
        step = jax.jit(functools.partial(train_step, config=cfg, task=task, tx=tx))
        look = jax.jit(functools.partial(_captured, model))
        first = None
        for t in range(steps + 1):
            outs = jax.device_get(look(state.params, batch["tokens"]))
            first = first or outs
            for layer, x in outs.items():
                x = np.asarray(x, np.float32)
                rows.append(
                    {
                        "width": width,
                        "step": t,
                        "layer": layer,
                        "size": float(np.mean(np.abs(x))),
                        "update": float(np.mean(np.abs(x - first[layer]))),
                    }
                )
            if t < steps:
                state, _ = step(state, batch)
    return rows


def coord_growth(
    rows: Sequence[dict[str, Any]], key: str = "update", step: int | None = None
) -> dict:
    """layer -> (value at the widest width) / (value at the narrowest), at `step` (default: the
    last): about 1 when coordinates stay flat, about the width ratio (or more) when they grow."""
    step = max(r["step"] for r in rows) if step is None else step
    at = [r for r in rows if r["step"] == step]
    lo, hi = min(r["width"] for r in at), max(r["width"] for r in at)
    value = {(r["width"], r["layer"]): r[key] for r in at}
    layers = dict.fromkeys(r["layer"] for r in at)
    return {layer: value[hi, layer] / max(value[lo, layer], 1e-30) for layer in layers}
