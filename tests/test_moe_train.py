"""MoE end to end: expert-parallel train steps equal one device; a tiny MoE learns, balanced."""

import json

import jax
import numpy as np
import pytest

from jaxlm import loop, sharding
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.run import init_train_state, make_train_step

TOK = ByteTokenizer()
DOCS = [f"def h{i}(z):\n    return z ** {i % 3} + {i}\n" * (1 + i % 3) for i in range(64)]


def _config(*overrides):
    return load_config(
        "tiny-moe",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "optim.warmup_steps=2",
            "train.steps=20",
            "model.moe.load_balance_weight=0.01",
            "model.moe.router_z_weight=0.001",
            *overrides,
        ],
    )


def _run(cfg, devices, steps=3):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    state = init_train_state(cfg, mesh, 0)
    step = make_train_step(cfg, mesh)
    ds = build_dataset(DOCS, TOK, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=0)
    it = DataIterator(ds)
    history = []
    for _ in range(steps):
        state, m = step(state, to_global(next(it), mesh))
        history.append({k: float(v) for k, v in m.items()})
    return history, jax.device_get(state.params)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize(
    "mesh",
    [
        ("mesh.data=2", "mesh.fsdp=1", "mesh.expert=4", "mesh.rules=fsdp_ep"),
        ("mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", "mesh.rules=fsdp_tp_ep"),
    ],
    ids=["data2_expert4", "fsdp2_expert2_tensor2"],
)
def test_expert_parallel_steps_equal_one_device(mesh, dispatch):
    one_cfg = _config(f"model.moe.dispatch={dispatch}", "mesh.fsdp=1")
    want, want_params = _run(one_cfg, jax.devices()[:1])
    got, got_params = _run(_config(f"model.moe.dispatch={dispatch}", *mesh), jax.devices())
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "aux_loss", "moe_lb_loss", "moe_load_max", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    for x, y in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_tiny_moe_learns_the_default_corpus_with_balanced_experts(tmp_path, stdlib_cache):
    cfg = load_config(
        "tiny-moe",
        [
            "data.seq_len=64",
            "data.batch_size=8",
            "train.steps=60",
            "train.eval_every=1000",
            "train.eval_batches=1",
            "train.log_every=10",
            "train.sample_tokens=0",
            "train.peak_flops_per_device=1e11",
            "checkpoint.every=1000",
            "mesh.fsdp=2",
            "mesh.expert=4",
            "mesh.rules=fsdp_ep",
            "model.moe.load_balance_weight=0.05",
        ],
    )
    loop.train(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < 0.75 * train[0]["loss"], [r["loss"] for r in train]
    # Balanced enough (1 = each expert gets exactly its share of one step's assignments): on
    # average over the logged steps no expert takes 1.7x its share or less than 0.4x, and at the
    # end none is starved.
    assert np.mean([r["moe_load_max"] for r in train]) < 1.7, train
    assert np.mean([r["moe_load_min"] for r in train]) > 0.4, train
    assert train[-1]["moe_load_min"] > 0.5 and train[-1]["moe_load_max"] < 1.5
    assert all(r["moe_dropped_fraction"] == 0.0 and r["moe_lb_loss"] > 0 for r in train)
    for r in train:  # per-expert shares, consistent with the max/min summaries
        loads = [r[f"moe_expert_load_{i}"] for i in range(4)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        assert max(loads) * 4 == pytest.approx(r["moe_load_max"], rel=1e-5)
