"""The train step: sharded = one device, accumulation = big batch, overfitting, no recompiles."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from jaxlm.configs import MeshConfig, get_preset
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.run import init_train_state, make_train_step, train_state_from_params
from jaxlm.sharding import make_mesh

TOK = ByteTokenizer()
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5) for i in range(64)]


def _config(*overrides):
    return load_config(
        "tiny",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "optim.warmup_steps=2",
            "optim.learning_rate=3e-3",
            "train.steps=20",
            *overrides,
        ],
    )


def _batches(cfg, n, seed=0):
    ds = build_dataset(
        DOCS, TOK, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=seed
    )
    it = DataIterator(ds)
    return [next(it) for _ in range(n)]


def _losses(cfg, batches):
    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, 0)
    step = make_train_step(cfg, mesh)
    out = []
    for batch in batches:
        state, metrics = step(state, to_global(batch, mesh))
        out.append(float(metrics["loss"]))
    return out, state


@pytest.fixture(scope="module")
def single_device_losses():
    cfg = _config("mesh.fsdp=1")
    return _run_on(cfg, jax.devices()[:1])


def _run_on(cfg, devices):
    from jaxlm import sharding

    mesh = sharding.make_mesh(cfg.mesh, devices)
    state = init_train_state(cfg, mesh, 0)
    step = make_train_step(cfg, mesh)
    losses = []
    for batch in _batches(cfg, 5):
        state, metrics = step(state, to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        ("mesh.data=8", "mesh.fsdp=1", "mesh.rules=dp"),
        ("mesh.fsdp=8", "mesh.rules=fsdp"),
        ("mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp"),
        ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"),
    ],
)
def test_five_sharded_steps_equal_one_device(single_device_losses, overrides):
    cfg = _config(*overrides)
    losses = _run_on(cfg, jax.devices())
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_gradient_accumulation_equals_one_big_batch():
    big = _config("mesh.fsdp=1")
    accumulated = _config("mesh.fsdp=1", "train.microbatches=4")
    batches = _batches(big, 2)
    devices = jax.devices()[:1]
    from jaxlm import sharding

    results = []
    for cfg in (big, accumulated):
        mesh = sharding.make_mesh(cfg.mesh, devices)
        state = init_train_state(cfg, mesh, 0)
        step = make_train_step(cfg, mesh)
        for batch in batches:
            state, metrics = step(state, to_global(batch, mesh))
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s2.params, s1.params
    )


def test_tiny_model_overfits_one_repeated_batch():
    cfg = _config(
        "mesh.fsdp=8",
        "train.steps=150",
        "optim.schedule=constant",
        "optim.learning_rate=1e-2",
        "optim.weight_decay=0",
    )
    batch = _batches(cfg, 1)[0]
    losses, _ = _losses(cfg, [batch] * 150)
    assert losses[0] > 4.0
    assert losses[-1] < 0.1, losses[-10:]


def test_train_step_compiles_once(caplog):
    cfg = _config("mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, 0)
    step = make_train_step(cfg, mesh)
    batches = [to_global(b, mesh) for b in _batches(cfg, 4)]
    state, _ = step(state, batches[0])  # compiles here
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        for batch in batches[1:]:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    compiles = [
        r for r in caplog.records if "Compiling" in r.getMessage() and "lambda" in r.getMessage()
    ]
    assert not compiles, [r.getMessage()[:120] for r in compiles]
    assert step.jitted._cache_size() == 1


def test_bfloat16_compute_with_float32_params_trains():
    cfg = _config("mesh.fsdp=8", "model.dtype=bfloat16", "model.param_dtype=float32")
    losses, state = _losses(cfg, _batches(cfg, 5))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_llama_style_preset_trains_with_adafactor_and_lion():
    for opt in ("adafactor", "lion"):
        cfg = dataclasses.replace(
            _config("mesh.fsdp=8", f"optim.name={opt}"), model=get_preset("tiny-llama")
        )
        losses, _ = _losses(cfg, _batches(cfg, 5))
        assert losses[-1] < losses[0], (opt, losses)


def test_a_state_around_given_params_is_the_initial_state():
    """`train_state_from_params` (imported weights) == `init_train_state` for the same params:
    optimizer state, RNG, counters and shardings."""
    cfg = load_config("tiny", ["optim.name=adamw", "seed=3"])
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2), jax.devices())
    expected = init_train_state(cfg, mesh, cfg.seed)
    params = jax.tree.map(lambda x: x.copy(), expected.params)
    got = train_state_from_params(cfg, mesh, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
