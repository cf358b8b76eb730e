"""Cooldown studies: a branch from a constant-learning-rate trunk is bitwise the run that trained
the whole warmup-stable-decay schedule itself; the sweep skips finished branches, resumes a cut
one from its own checkpoint, and refuses branches that cannot continue the trunk."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, loop
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.scaling import cooldown_grid, load_results, run_sweep
from jaxlm.scaling.sweep import check_runs

PER_STEP = 32 * 8  # tokens per step


def _base():
    return load_config(
        "tiny",
        [
            "model.d_model=32",
            "model.num_heads=2",
            "model.mlp_dim=128",
            "data.seq_len=32",
            "data.batch_size=8",
            "train.eval_batches=2",
            "train.sample_tokens=0",
            "train.log_every=1",
            "optim.warmup_steps=2",
            "optim.min_lr_ratio=0.0",
            "checkpoint.every=5",
            "checkpoint.keep=1",
        ],
    )


def _params(state):
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    }


def _losses(workdir):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _eval_loss(workdir):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def test_branches_equal_straight_runs_and_the_sweep_resumes_and_refuses(tmp_path):
    base = _base()
    grid = cooldown_grid(
        base,
        {"d32": base.model},
        [8 * PER_STEP, 12 * PER_STEP],
        decay_fraction=0.25,
        decay="1-sqrt",
    )
    assert [r.name for r in grid] == ["d32_stable", "d32_D2.05e+03", "d32_D3.07e+03"]
    trunk, short, long = grid
    assert (trunk.config.train.steps, trunk.config.optim.schedule, trunk.results) == (
        9,
        "constant",
        False,
    )
    assert trunk.config.checkpoint.kept_steps == (6, 9)
    assert [(r.config.train.steps, r.config.train.branch_from_step) for r in (short, long)] == [
        (8, 6),
        (12, 9),
    ]

    states = {}

    def train(config, workdir):
        states[workdir.name] = loop.train(config, workdir)["state"]

    sweep = tmp_path / "sweep"
    rows = run_sweep(grid, sweep, log=lambda _: None, train_fn=train)
    # Both branch points survive retention (keep=1, every=5) in the trunk.
    assert checkpoint.complete_steps(sweep / "d32_stable") == [6, 9]

    # The reference: each point trained alone on its warmup-stable-decay schedule.
    for run in (short, long):
        alone = dataclasses.replace(
            run.config, train=dataclasses.replace(run.config.train, branch_from_step=None)
        )
        ref = tmp_path / f"alone_{run.name}"
        want = loop.train(alone, ref)["state"]
        got = states[run.name]
        for name, x in _params(want).items():
            np.testing.assert_array_equal(_params(got)[name], x, err_msg=f"{run.name} {name}")
        start = run.config.train.branch_from_step
        branch_losses = _losses(sweep / run.name)
        assert sorted(branch_losses) == list(range(start + 1, run.config.train.steps + 1))
        assert branch_losses == {s: v for s, v in _losses(ref).items() if s > start}
        row = next(r for r in rows if r["name"] == run.name)
        assert row["eval_loss"] == _eval_loss(ref)
        assert row["tokens"] == run.config.train.steps * PER_STEP
        assert row["flops"] == 6 * row["params"] * row["tokens"]
        steps = run.config.train.steps
        assert row["flops_trained"] == pytest.approx(row["flops"] * (steps - start) / steps)
    assert [r["name"] for r in rows] == ["d32_D2.05e+03", "d32_D3.07e+03"]  # no trunk row
    assert [r["name"] for r in load_results(sweep)] == [r["name"] for r in rows]

    # Rerun: nothing trains. Then the long branch loses its last checkpoint (cut off after step
    # 10): the rerun resumes it from its own step 10, not from the trunk, and ends the same.
    done = {n: v.copy() for n, v in _params(states["d32_D3.07e+03"]).items()}
    states.clear()
    run_sweep(grid, sweep, log=lambda _: None, train_fn=train)
    assert states == {}
    shutil.rmtree(sweep / "d32_D3.07e+03" / "checkpoints" / "12")
    messages = []
    run_sweep(grid, sweep, log=messages.append, train_fn=train)
    assert list(states) == ["d32_D3.07e+03"]
    assert any(m.startswith("sweep 3/3: d32_D3.07e+03 (N=") for m in messages)
    for name, x in done.items():
        np.testing.assert_array_equal(_params(states["d32_D3.07e+03"])[name], x, err_msg=name)

    # Branches that cannot continue the trunk are refused before anything is written.
    trunk_dir = sweep / "d32_stable"

    def branch(*overrides):
        return apply_overrides(long.config, [f"train.branch_from={trunk_dir}", *overrides])

    nowhere = apply_overrides(long.config, [f"train.branch_from={tmp_path / 'nowhere'}"])
    cases = [
        (branch("model.d_model=64"), "(model.d_model: 32 there, 64 here"),
        (branch("train.branch_from_step=7"), "train.branch_from_step=7: no such checkpoint"),
        (branch("train.steps=9"), "train.steps=9 leaves nothing to train; set train.steps > 9"),
        (nowhere, "no complete checkpoint there"),
        (long.config, "train.branch_from_step=9 needs train.branch_from"),
    ]  # fmt: skip
    for config, message in cases:
        out = tmp_path / "refused"
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
            loop.train(config, out)
        assert not out.exists()


def test_bad_cooldown_grids_and_settings_are_refused():
    base = _base()
    with pytest.raises(ValueError, match=r"decay_fraction=1 must be in \(0, 1\)"):
        cooldown_grid(base, {"m": base.model}, [1e4], decay_fraction=1)
    with pytest.raises(
        ValueError, match="its cooldown would start at step 2, which must be after the warmup"
    ):
        cooldown_grid(base, {"m": base.model}, [3 * PER_STEP], decay_fraction=0.25)
    trunk, branch = cooldown_grid(base, {"m": base.model}, [12 * PER_STEP], decay_fraction=0.25)
    wrong = {
        13: "branches at step 13, beyond its trunk 'm_stable'",
        8: "branches at step 8, which its trunk 'm_stable' does not keep",
    }
    for step, message in wrong.items():
        moved = dataclasses.replace(
            branch, config=apply_overrides(branch.config, [f"train.branch_from_step={step}"])
        )
        with pytest.raises(ValueError, match=message):
            check_runs([trunk, moved])
    with pytest.raises(ValueError, match="which is not an earlier run of the sweep"):
        check_runs([branch, trunk])
    with pytest.raises(ValueError, match="'x' is not a step >= 1"):
        apply_overrides(base, ["checkpoint.keep_steps=5,x"])
    with pytest.raises(ValueError, match="wsd_decay='cosine' is not valid"):
        apply_overrides(base, ["optim.wsd_decay=cosine"])
    with pytest.raises(ValueError, match="branch_from and init_from are both set"):
        apply_overrides(base, ["train.branch_from=a", "train.init_from=b"])
