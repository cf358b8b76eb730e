"""Schedules against their closed forms; weight decay only where the mask says."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.configs import OptimConfig
from jaxlm.optim import decay_mask, make_optimizer, schedule

PEAK, WARMUP, TOTAL, FLOOR = 1e-3, 10, 110, 1e-4


def _expected(kind, step):
    if step < WARMUP:
        return PEAK * step / WARMUP
    t = (step - WARMUP) / (TOTAL - WARMUP)
    if kind == "constant":
        return PEAK
    if kind == "cosine":
        return FLOOR + (PEAK - FLOOR) * (1 + math.cos(math.pi * t)) / 2
    if kind == "linear":
        return PEAK - (PEAK - FLOOR) * t
    if kind == "wsd":  # stable until the last 20% of all steps, then linear to the floor
        return PEAK if step <= 0.8 * TOTAL else PEAK - (PEAK - FLOOR) * (step - 88) / 22
    if kind == "wsd:1-sqrt":  # the same, decaying as 1 - sqrt(progress)
        return (
            PEAK
            if step <= 0.8 * TOTAL
            else FLOOR + (PEAK - FLOOR) * (1 - math.sqrt((step - 88) / 22))
        )
    return PEAK * math.sqrt(WARMUP / step)  # inverse_sqrt


@pytest.mark.parametrize(
    "kind", ["constant", "cosine", "linear", "wsd", "wsd:1-sqrt", "inverse_sqrt"]
)
def test_schedules_match_closed_forms(kind):
    name, _, decay = kind.partition(":")
    cfg = OptimConfig(
        learning_rate=PEAK,
        schedule=name,
        warmup_steps=WARMUP,
        min_lr_ratio=0.1,
        wsd_decay=decay or "linear",
    )
    lr = schedule(cfg, TOTAL)
    for step in [0, 1, 5, 10, 11, 50, 88, 90, 99, 105, 110]:
        assert float(lr(step)) == pytest.approx(_expected(kind, step), rel=1e-5, abs=1e-12), step


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {
        "embed": {"embedding": 0},
        "pos_embed": {"embedding": 0},
        "layers": {"attn": {"query": {"w": 0, "b": 0}}, "attn_norm": {"scale": 0, "bias": 0}},
        "final_norm": {"scale": 0},
        "unembed": {"w": 0},
    }
    mask = decay_mask(params)
    assert mask["layers"]["attn"]["query"] == {"w": True, "b": False}
    assert mask["unembed"]["w"] is True
    assert not any(jax.tree.leaves([mask["embed"], mask["pos_embed"], mask["final_norm"]]))
    assert not any(jax.tree.leaves(mask["layers"]["attn_norm"]))


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_never_touches_masked_params(name):
    params = {
        "dense": {"w": jnp.full((4, 4), 2.0)},
        "norm": {"scale": jnp.full((4,), 2.0)},
        "embed": {"embedding": jnp.full((4, 4), 2.0)},
    }
    cfg = OptimConfig(
        name=name,
        learning_rate=0.1,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.5,
        clip_norm=None,
    )
    tx = make_optimizer(cfg, 10)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    p = params
    for _ in range(3):
        updates, state = tx.update(zeros, state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])
    np.testing.assert_array_equal(p["embed"]["embedding"], params["embed"]["embedding"])
    assert float(p["dense"]["w"][0, 0]) < 2.0
    if name in ("adamw", "lion"):  # decoupled decay: p <- p (1 - lr wd) when the gradient is 0
        np.testing.assert_allclose(p["dense"]["w"], 2.0 * (1 - 0.1 * 0.5) ** 3, rtol=1e-6)


def test_clipping_bounds_the_update_norm():
    cfg = OptimConfig(
        name="adamw",
        learning_rate=1.0,
        schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        clip_norm=0.5,
    )
    tx = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50 -> clipped to 0.5
    clip_only = optax.clip_by_global_norm(0.5)
    clipped, _ = clip_only.update(grads, clip_only.init(params))
    np.testing.assert_allclose(clipped["w"], [0.3, 0.4, 0.0], rtol=1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))
