"""Structured pruning: the smaller model computes what the original computes with the removed
heads, neurons and layers zeroed; scores against NumPy and finite differences; sizes for a
target; a trained run pruned to 75% and fine-tuned; bad targets refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, loop
from jaxlm.compress import prune
from jaxlm.configs.overrides import load_config
from jaxlm.metrics import param_count
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, load_for_eval
from tests.random_params import random_params


def _logits(cfg, params, tokens):
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens)[0])


def _tokens(cfg, b=2, t=24):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def _zeroed(cfg, params, plan):
    """The original parameters with every removed group's output weights set to zero."""
    p = jax.tree.map(np.array, jax.device_get(params))
    g = cfg.num_groups
    for li in range(cfg.num_layers):
        blk = p["layers"] if cfg.scan_layers else p[f"layers_{li}"]
        at = (li,) if cfg.scan_layers else ()
        attn, mlp = blk["attn"], blk["mlp"]
        if li not in plan.layers:  # a removed pre-LN block: both branches add nothing
            attn["out"]["w"][at] = 0
            mlp["down"]["w"][at] = 0
            for part in (attn["out"], mlp["down"]):
                if "b" in part:
                    part["b"][at] = 0
            continue
        gone_kv = [h for h in range(cfg.num_kv_heads) if h not in plan.kv_groups[li]]
        for h in gone_kv:
            attn["out"]["w"][(*at, slice(h * g, (h + 1) * g))] = 0
        gone = [j for j in range(cfg.mlp_dim) if j not in plan.neurons[li]]
        mlp["down"]["w"][(*at, gone)] = 0
    return p


@pytest.mark.parametrize(
    "preset,sets",
    [
        ("tiny-llama", []),  # GQA, SwiGLU, no biases, scanned
        ("tiny", ["model.scan_layers=false", "model.num_layers=3"]),  # biases, unrolled
    ],
)
def test_the_pruned_model_is_the_original_with_the_removed_groups_zeroed(preset, sets):
    cfg = load_config(preset, sets).model
    params = random_params(cfg, seed=5)
    keep = {"heads": 0.5, "mlp": 0.5, "layers": 0.5}
    small, pruned, plan = prune.prune_params(cfg, params, keep=keep, score="magnitude")
    assert small.num_kv_heads == max(1, cfg.num_kv_heads // 2)
    assert small.num_heads == small.num_kv_heads * cfg.num_groups
    assert small.mlp_dim == cfg.mlp_dim // 2 and small.num_layers == cfg.num_layers // 2
    assert param_count(small).total == sum(x.size for x in jax.tree.leaves(pruned))
    tokens = _tokens(cfg)
    want = _logits(cfg, _zeroed(cfg, params, plan), tokens)
    np.testing.assert_allclose(_logits(small, pruned, tokens), want, rtol=2e-5, atol=2e-5)


def test_magnitude_scores_match_numpy():
    cfg = load_config("tiny-llama").model
    params = jax.device_get(random_params(cfg, seed=6))
    heads, neurons, layers = prune.group_scores(cfg, params, None)
    blk = jax.tree.map(lambda x: np.asarray(x[1], np.float64), params["layers"])  # layer 1
    up, gate, down = (blk["mlp"][n]["w"] for n in ("up", "gate", "down"))
    want = np.sqrt((up**2).sum(0) + (gate**2).sum(0) + (down**2).sum(1))
    np.testing.assert_allclose(neurons[1], want, rtol=1e-5)
    a, g = blk["attn"], cfg.num_groups
    for h in range(cfg.num_kv_heads):
        q = slice(h * g, (h + 1) * g)
        total = (a["query"]["w"][:, q] ** 2).sum() + (a["out"]["w"][q] ** 2).sum()
        total += (a["key"]["w"][:, h] ** 2).sum() + (a["value"]["w"][:, h] ** 2).sum()
        np.testing.assert_allclose(heads[1, h], np.sqrt(total), rtol=1e-5)
    whole = sum((np.asarray(x) ** 2).sum() for x in jax.tree.leaves(blk))
    np.testing.assert_allclose(layers[1], np.sqrt(whole), rtol=1e-5)


def test_taylor_scores_are_the_loss_derivative_by_finite_differences():
    """|Σ w ∂L/∂w| over a group = |d L(group scaled by s) / ds| at s = 1."""
    cfg = load_config("tiny-llama").model
    params = jax.device_get(random_params(cfg, seed=7))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 33)).astype(np.int32)
    pos = np.broadcast_to(np.arange(32, dtype=np.int32), (2, 32))
    batch = dict(tokens=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]),
                 positions=jnp.asarray(pos), segment_ids=jnp.ones((2, 32), jnp.int32),
                 mask=jnp.ones((2, 32), bool))  # fmt: skip
    grads = prune.calibration_grads(cfg, params, [batch])
    heads, neurons, _ = prune.group_scores(cfg, params, grads)

    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, batch["tokens"])[0].astype(jnp.float64)
        logp = jax.nn.log_softmax(logits, -1)
        return -float(jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1)))

    def scaled(s, edit):
        p = jax.tree.map(np.array, params)
        edit(p, s)
        return p

    def neuron(j):
        def edit(p, s):
            m = p["layers"]["mlp"]
            m["up"]["w"][0, :, j] *= s
            m["gate"]["w"][0, :, j] *= s
            m["down"]["w"][0, j] *= s

        return edit

    def head(h):
        def edit(p, s):
            a, g = p["layers"]["attn"], cfg.num_groups
            q = slice(h * g, (h + 1) * g)
            a["query"]["w"][0, :, q] *= s
            a["out"]["w"][0, q] *= s
            a["key"]["w"][0, :, h] *= s
            a["value"]["w"][0, :, h] *= s

        return edit

    eps = 1e-2
    for j in np.argsort(-neurons[0])[:3]:
        fd = (loss(scaled(1 + eps, neuron(j))) - loss(scaled(1 - eps, neuron(j)))) / (2 * eps)
        np.testing.assert_allclose(neurons[0, j], abs(fd), rtol=0.03)
    for h in range(cfg.num_kv_heads):
        fd = (loss(scaled(1 + eps, head(h))) - loss(scaled(1 - eps, head(h)))) / (2 * eps)
        np.testing.assert_allclose(heads[0, h], abs(fd), rtol=0.03)


def test_sizes_for_a_target_are_the_largest_that_fit_and_bad_targets_are_refused():
    cfg = load_config("tiny-llama", ["model.num_kv_heads=4", "model.mlp_dim=256"]).model
    now = param_count(cfg).total
    for kinds in (("heads", "mlp"), ("mlp",), ("heads", "mlp", "layers")):
        k, f, n = prune.sizes_for_target(cfg, int(0.75 * now), kinds)
        got = param_count(prune.pruned_config(cfg, k, f, n)).total
        assert got <= 0.75 * now
        if "layers" not in kinds:  # 2 layers: keeping under all of them keeps one
            assert got > 0.6 * now  # not needlessly small
    with pytest.raises(ValueError, match=rf"--target-params {now:,} must be below the model's"):
        prune.sizes_for_target(cfg, now, ("heads", "mlp"))
    with pytest.raises(ValueError, match=r"at least [\d,]+ \(one kv head, one neuron"):
        prune.sizes_for_target(cfg, 1000, ("heads", "mlp"))
    with pytest.raises(ValueError, match=r"keep=\{'heads': 0.0\} must map"):
        prune.prune_params(cfg, {}, keep={"heads": 0.0}, score="magnitude")
    moe = load_config("tiny-moe").model
    with pytest.raises(ValueError, match=r"Mixture-of-Experts"):
        prune.sizes_for_target(moe, 1000, ("mlp",))


def test_sizes_for_a_target_are_those_whose_pruned_model_has_the_lowest_calibration_loss(trained):
    config, mesh, params, tokenizer = load_for_eval(trained)
    cfg = config.model
    it = RunPlan(config, mesh=mesh, tokenizer=tokenizer).make_iterator()
    keys = ("tokens", "positions", "segment_ids", "targets", "mask")
    batches = [{k: v for k, v in next(it).items() if k in keys} for _ in range(2)]
    scores = prune.group_scores(cfg, params, prune.calibration_grads(cfg, params, batches))
    target = int(0.7 * param_count(cfg).total)
    # The reference: every number of kv heads with the most neurons that fit, each scored by
    # the original model with the removed groups zeroed, its loss computed here.
    losses = {}
    n = cfg.num_layers
    for k in range(1, cfg.num_kv_heads + 1):
        fits = [f for f in range(1, cfg.mlp_dim + 1)
                if param_count(prune.pruned_config(cfg, k, f, n)).total <= target]  # fmt: skip
        f = max(fits)
        plan = prune.plan_pruning(cfg, scores, k, f, n)
        zeroed = _zeroed(cfg, params, plan)
        nll = []
        for b in batches:
            logits = np.asarray(
                Transformer(cfg).apply({"params": zeroed}, *(b[k] for k in keys[:3]))[0], np.float64
            )
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            t, m = np.asarray(b["targets"]), np.asarray(b["mask"], bool)
            nll.append(-np.take_along_axis(logp, t[..., None], -1)[..., 0][m].mean())
        losses[(k, f, n)] = float(np.mean(nll))
    got = prune.sizes_by_loss(cfg, params, target, ("heads", "mlp"), scores, batches)
    assert got == min(losses, key=losses.get), (got, losses)
    assert len(set(losses)) > 1 and max(losses.values()) - min(losses.values()) > 0.01
    # One common fraction would have kept other sizes here (measured: 1 kv head of 2 kept).
    assert prune.sizes_for_target(cfg, target, ("heads", "mlp")) != got


def test_a_trained_run_pruned_to_75_percent_and_fine_tuned_recovers(
    trained, tmp_path, stdlib_cache
):
    config = checkpoint.load_run_config(trained)
    now = param_count(config.model).total
    base = loop.eval_workdir(trained, max_batches=4)["eval_loss"]
    out, _ = prune.prune_workdir(trained, tmp_path / "pruned", target_params=int(0.75 * now))
    small = checkpoint.load_run_config(out).model
    assert param_count(small).total <= 0.75 * now
    pruned = loop.eval_workdir(out, max_batches=4)["eval_loss"]
    # Fine-tune for 10% of the original 150 steps with the normal trainer.
    tune = dataclasses.replace(
        checkpoint.load_run_config(out),
        train=dataclasses.replace(config.train, steps=15, eval_every=15),
        checkpoint=dataclasses.replace(config.checkpoint, every=15),
    )
    loop.train(tune, out)
    tuned = loop.eval_workdir(out, max_batches=4)["eval_loss"]
    assert tuned < pruned
    assert np.exp(tuned - base) - 1 < 0.05, (base, pruned, tuned)
    # The same sizes kept at random lose more, on average, than by the Taylor score
    # (measured: 2.87 against 3.15, 3.04 and 2.85).
    _, mesh, params, _ = load_for_eval(trained)
    losses = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        scores = tuple(rng.random(x.shape) for x in prune.group_scores(config.model, params, None))
        sizes = (small.num_kv_heads, small.mlp_dim, small.num_layers)
        rsmall, rparams = prune.apply_plan(
            config.model, params, prune.plan_pruning(config.model, scores, *sizes)
        )
        assert rsmall == small
        rplan = RunPlan(dataclasses.replace(config, model=rsmall), mesh=mesh)
        losses.append(loop.evaluate(rplan, rparams, max_batches=4)["eval_loss"])
    assert pruned < np.mean(losses), (pruned, losses)
