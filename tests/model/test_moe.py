"""The MoE block against a naive per-token reference, hand-computed routing, and closed forms."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.configs import MoEConfig, get_preset
from jaxlm.metrics import param_count
from jaxlm.model import moe as moe_lib
from jaxlm.model.moe import MoE
from jaxlm.model.transformer import abstract_params

BASE = dataclasses.replace(get_preset("tiny-moe"), d_model=16, mlp_dim=24, num_heads=2)
B, T = 2, 5


def _cfg(**moe):
    return dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, **moe))


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(MoE(cfg).init(jax.random.key(0), jnp.zeros((B, T, cfg.d_model))))

    def one(x):
        return jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree.map(one, shapes)


def _x(cfg, seed=1):
    return jnp.asarray(
        np.random.default_rng(seed).standard_normal((B, T, cfg.d_model)), jnp.float32
    )


def _silu(x):
    return x / (1 + np.exp(-x))


def _reference(cfg, params, x):
    """Loop over tokens; run each chosen expert on the token alone; weighted sum (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]
    m = cfg.moe
    out = np.zeros(x.shape, np.float64)
    xs = np.asarray(x, np.float64)
    for bi in range(x.shape[0]):
        for ti in range(x.shape[1]):
            v = xs[bi, ti]
            logits = v @ p["router"]["w"]
            if m.score == "softmax":
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
            else:
                probs = 1 / (1 + np.exp(-logits))
            chosen = np.argsort(-probs, kind="stable")[: m.top_k]
            weights = probs[chosen]
            if m.renormalize:
                weights = weights / weights.sum()
            y = np.zeros_like(v)
            for e, w in zip(chosen, weights, strict=True):
                h = _silu(v @ p["gate"][e]) * (v @ p["up"][e])
                y += w * (h @ p["down"][e])
            if m.num_shared_experts:
                s = p["shared"]
                h = _silu(v @ s["gate"]["w"]) * (v @ s["up"]["w"])
                shared = h @ s["down"]["w"]
                if m.shared_expert_gate:
                    shared *= 1 / (1 + np.exp(-(v @ p["shared_gate"]["w"])))
                y += shared
            out[bi, ti] = y
    return out


VARIANTS = {
    "renorm": dict(),
    "no_renorm": dict(renormalize=False),
    "shared_gated_no_renorm": dict(
        renormalize=False, num_shared_experts=2, shared_expert_gate=True
    ),
    "shared_sigmoid_top1": dict(score="sigmoid", top_k=1, num_shared_experts=1),
    "fine_grained_top3": dict(num_experts=6, top_k=3, expert_mlp_dim=8),
}


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_both_dispatch_paths_equal_the_per_token_reference(name, dispatch):
    # capacity_factor = E: every expert can take every token, so nothing is dropped.
    cfg = _cfg(**VARIANTS[name], dispatch=dispatch, capacity_factor=8.0)
    params, x = _params(cfg), _x(cfg)
    out, aux = MoE(cfg).apply(params, x)
    np.testing.assert_allclose(out, _reference(cfg, params, x), atol=1e-5, rtol=1e-5)
    assert float(aux["moe_dropped_fraction"]) == 0.0


def _routed_inputs(cfg, experts):
    """Router = 10 * identity on the first E features; token n is one-hot at experts[n]."""
    e = cfg.moe.num_experts
    params = _params(cfg)
    w = np.zeros((cfg.d_model, e), np.float32)
    w[np.arange(e), np.arange(e)] = 10.0
    params["params"]["router"]["w"] = jnp.asarray(w)
    x = np.zeros((1, len(experts), cfg.d_model), np.float32)
    x[0, np.arange(len(experts)), experts] = 1.0
    return params, jnp.asarray(x)


def test_small_capacity_drops_exactly_the_overflow():
    # 6 tokens, top-1, 2 experts, capacity_factor 1 -> C = ceil(6 * 1 / 2) = 3 per expert.
    cfg = _cfg(num_experts=2, top_k=1, dispatch="capacity", capacity_factor=1.0)
    params, x = _routed_inputs(cfg, [0, 0, 1, 0, 0, 1])
    out, aux = MoE(cfg).apply(params, x)
    assert float(aux["moe_dropped_fraction"]) == pytest.approx(1 / 6)  # the 4th token to expert 0
    np.testing.assert_allclose(out[0, 4], 0.0, atol=1e-7)  # a dropped token adds nothing
    dropless, _ = MoE(
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless"))
    ).apply(params, x)
    kept = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(out[0, kept], dropless[0, kept], atol=1e-6)


def test_capacity_priority_is_first_choices_first():
    # Token 0 -> (0, 1), token 1 -> (0, 1), token 2 -> (1, 0); capacity 2 per expert.
    # First choices take e0: t0, t1 and e1: t2; second choices: t0 -> e1 (slot 1, kept),
    # t1 -> e1 (slot 2, dropped), t2 -> e0 (slot 2, dropped).
    dispatch, kept = moe_lib.capacity_dispatch(jnp.asarray([[0, 1], [0, 1], [1, 0]]), 2, 2)
    assert np.asarray(kept).tolist() == [[True, True], [True, False], [True, False]]
    assert np.asarray(dispatch).sum() == 4
    assert np.asarray(dispatch)[0, 1, 1, 1] == 1  # token 0's second choice: expert 1, slot 1


def test_load_balancing_loss_closed_form_and_minimum():
    probs = jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = jnp.asarray([[0], [1], [0], [2]])
    # f = (2/4, 1/4, 1/4); P = column means = (0.375, 0.3125, 0.3125); E * sum(f * P)
    want = 3 * (0.5 * 0.375 + 0.25 * 0.3125 + 0.25 * 0.3125)
    assert float(moe_lib.load_balancing_loss(probs, experts)) == pytest.approx(want)
    uniform = jnp.full((6, 3), 1 / 3)
    balanced = jnp.asarray([[0], [1], [2], [0], [1], [2]])
    assert float(moe_lib.load_balancing_loss(uniform, balanced)) == pytest.approx(1.0)
    skewed = jnp.asarray([[0]] * 6)
    assert float(moe_lib.load_balancing_loss(jax.nn.one_hot(skewed[:, 0], 3), skewed)) == 3.0


def test_router_z_loss_formula():
    logits = np.random.default_rng(0).standard_normal((7, 5))
    lse = np.log(np.exp(logits).sum(-1))
    assert float(moe_lib.router_z_loss(jnp.asarray(logits))) == pytest.approx(
        np.mean(lse**2), rel=1e-5
    )


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_the_router_and_used_experts_only(dispatch):
    cfg = _cfg(num_experts=4, top_k=1, dispatch=dispatch, capacity_factor=4.0)
    params, x = _routed_inputs(cfg, [0, 1, 2, 0, 1])  # expert 3 gets no token
    x = x + 0.01 * _x(cfg)[:1, : x.shape[1]]  # every feature non-zero, routing unchanged

    def loss(p):
        out, aux = MoE(cfg).apply(p, x)
        return jnp.sum(out**2) + aux["moe_lb_loss"]

    g = jax.grad(loss)(params)["params"]
    assert float(jnp.abs(g["router"]["w"]).sum()) > 0
    for name in ("up", "gate", "down"):
        per_expert = np.abs(np.asarray(g[name])).sum(axis=(1, 2))
        assert (per_expert[:3] > 0).all() and per_expert[3] == 0.0, (name, per_expert)


def test_param_count_total_and_active_match_the_model():
    for name in ("tiny-moe", "fine-grained-moe", "mixtral-small"):
        cfg = get_preset(name)
        counts = param_count(cfg)
        leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
        assert counts.total == sum(x.size for x in leaves)
        m, f = cfg.moe, cfg.expert_mlp_dim
        unused = cfg.num_layers * (m.num_experts - m.top_k) * 3 * cfg.d_model * f
        assert counts.active == counts.total - unused


def test_moe_config_errors():
    with pytest.raises(ValueError, match=r"MoEConfig.top_k=5 must be in \[1, num_experts=4\]"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"MoEConfig.dispatch='sorted' is not valid"):
        MoEConfig(num_experts=4, dispatch="sorted")
    with pytest.raises(ValueError, match="needs first_dense=0 and num_layers divisible by every"):
        dataclasses.replace(BASE, num_layers=3, moe=MoEConfig(num_experts=4, every=2))


def test_router_jitter_only_with_a_router_rng():
    cfg = _cfg(router_jitter=0.5, top_k=1, num_experts=4, renormalize=False)
    params, x = _params(cfg), _x(cfg)
    plain, _ = MoE(cfg).apply(params, x)  # evaluation and sampling: no rng, deterministic
    np.testing.assert_array_equal(plain, MoE(cfg).apply(params, x)[0])
    np.testing.assert_allclose(plain, _reference(cfg, params, x), atol=1e-5)
    a, _ = MoE(cfg).apply(params, x, rngs={"router": jax.random.key(1)})
    b, _ = MoE(cfg).apply(params, x, rngs={"router": jax.random.key(2)})
    assert not np.allclose(a, plain) and not np.allclose(a, b)
