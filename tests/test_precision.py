"""Precision policies and dynamic loss scaling (`jaxlm.precision`): bfloat16 and float16 training
against the float32 loss curve, exactness of the scaling, overflows skipped with the scale
halved, growth, and a run that resumes bitwise with its scale."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, cli, loop, precision
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.data import to_global
from jaxlm.run import abstract_train_state, init_train_state, make_train_step
from jaxlm.sharding import make_mesh
from tests.test_checkpoint import _assert_trees_equal, _batches, _host, _loop_config

STEPS = 300
WINDOW = 25


def _config(*overrides):
    return load_config(
        "tiny-llama",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "optim.warmup_steps=20",
            f"train.steps={STEPS}",
            "mesh.fsdp=8",
            *overrides,
        ],
    )


def _train(cfg, batches, state=None):
    mesh = make_mesh(cfg.mesh)
    step = make_train_step(cfg, mesh)
    state = init_train_state(cfg, mesh, 0) if state is None else state
    history = []
    for b in batches:
        state, m = step(state, to_global(b, mesh))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def _windows(history):
    loss = np.array([h["loss"] for h in history])
    return loss.reshape(-1, WINDOW).mean(axis=1)


@pytest.fixture(scope="module")
def batches():
    return _batches(_config(), STEPS)


def test_bfloat16_and_float16_training_track_the_float32_loss_curve(batches):
    """300 steps of each policy on the same batches. The mean loss over each 25-step window is
    within 0.02 of float32's for bfloat16 and float16 compute with float32 weights; pure
    bfloat16 (weights and Adam's moments too) drifts while the loss falls fastest (within 0.3)
    and ends within 0.02. No loss is NaN and no step is skipped."""
    reference = None
    for dtype, param_dtype, early, late in [
        ("float32", "float32", 0, 0),
        ("bfloat16", "float32", 0.02, 0.02),
        ("float16", "float32", 0.02, 0.02),
        ("bfloat16", "bfloat16", 0.3, 0.02),
    ]:
        cfg = _config(f"model.dtype={dtype}", f"model.param_dtype={param_dtype}")
        state, history = _train(cfg, batches)
        assert not any(np.isnan(h["loss"]) or h["skipped"] for h in history), dtype
        # The policy is what the state holds: weights and optimizer moments in param_dtype.
        kinds = {x.dtype for x in jax.tree.leaves(state.params)}
        kinds |= {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim > 0}
        assert kinds == {jnp.dtype(param_dtype)}, (dtype, param_dtype, kinds)
        assert (state.loss_scale is not None) == (dtype == "float16")
        if dtype == "float16":  # 300 steps < the growth period, and no overflow: as it started
            assert {h["loss_scale"] for h in history} == {2.0**15}
            assert history[-1]["overflows"] == 0
        windows = _windows(history)
        if reference is None:
            reference = windows
            assert windows[-1] < windows[0] - 3  # it learns: 5.8 -> 0.4 nats
            continue
        gap = np.abs(windows - reference)
        assert gap.max() <= early and gap[-1] <= late, (dtype, param_dtype, gap.round(3))


def test_loss_scaling_at_float32_is_exact_and_grows_after_its_period(batches):
    """Multiplying by 2^k and back is exact in float32, so a scaled float32 run equals the
    unscaled one bitwise (8-device fsdp mesh, 2 microbatches); the scale doubles after
    `loss_scale_period` finite steps and the count restarts."""
    common = ("train.microbatches=2", "train.loss_scale_init=1024", "train.loss_scale_period=2")
    plain, _ = _train(_config("train.loss_scale=none", *common), batches[:3])
    scaled, history = _train(_config("train.loss_scale=dynamic", *common), batches[:3])
    _assert_trees_equal(scaled.params, plain.params)
    _assert_trees_equal(scaled.opt_state, plain.opt_state)
    assert [h["loss_scale"] for h in history] == [1024, 2048, 2048]
    assert int(scaled.loss_scale["good_steps"]) == 1 and int(scaled.loss_scale["overflows"]) == 0
    assert plain.loss_scale is None


def test_an_overflow_is_skipped_and_halves_the_scale(batches):
    """float16 compute from a scale of 2^20: the scaled gradients overflow, so each step is
    skipped (parameters and optimizer state bitwise unchanged, the streak untouched) and the
    scale halves until they fit; the first finite update equals a fresh run's at that scale. A NaN
    loss (a poisoned batch) is a non-finite step: skipped and counted, the scale kept."""
    cfg = _config(
        "model.dtype=float16",
        "train.loss_scale_init=1048576",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    )
    mesh = make_mesh(cfg.mesh)
    step = make_train_step(cfg, mesh)
    start = _host(init_train_state(cfg, mesh, 0))
    state = init_train_state(cfg, mesh, 0)
    batch = to_global(batches[0], mesh)
    scales = []
    for _ in range(12):
        before = float(state.loss_scale["scale"])
        state, m = step(state, batch)
        if not m["skipped"]:
            break
        assert float(m["overflow"]) == 1 and float(m["loss_scale"]) == before / 2
        assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 0
        _assert_trees_equal(_host(state.params), start.params)
        _assert_trees_equal(_host(state.opt_state), start.opt_state)
        scales.append(before)
    assert 1 <= len(scales) < 12, scales
    assert int(state.loss_scale["overflows"]) == len(scales)
    assert int(state.loss_scale["good_steps"]) == 1

    # The reference: a fresh run that starts at the scale the overflows ended on takes the same
    # first update (the skipped steps left nothing behind but the step counter).
    fitted = scales[-1] / 2
    fresh_cfg = apply_overrides(cfg, [f"train.loss_scale_init={fitted}"])
    reference, _ = make_train_step(fresh_cfg, mesh)(init_train_state(fresh_cfg, mesh, 0), batch)
    _assert_trees_equal(state.params, reference.params)
    _assert_trees_equal(state.opt_state, reference.opt_state)

    poisoned = dict(batches[1], tokens=batches[1]["tokens"].copy())
    poisoned["tokens"][3, 5] = cfg.model.vocab_size  # out of the table: a NaN embedding
    scale = float(state.loss_scale["scale"])
    state, m = step(state, to_global(poisoned, mesh))
    assert float(m["skipped"]) == 1 and float(m["overflow"]) == 0
    assert (int(state.nonfinite_streak), int(state.nonfinite_total)) == (1, 1)
    assert float(state.loss_scale["scale"]) == scale
    assert int(state.loss_scale["overflows"]) == len(scales)


def test_precision_describe_and_auto(capsys):
    assert cli.main(["info", "--set", "model.dtype=float16"]) == 0
    assert "precision:                  float16 compute, float32 weights" in capsys.readouterr().out
    line = precision.describe(_config("model.dtype=float16"))
    assert line.startswith("float16 compute, float32 weights and optimizer state; dynamic loss")
    assert "from 32768" in line and "after 2000 finite steps" in line
    assert precision.describe(_config("model.dtype=bfloat16", "model.param_dtype=bfloat16")) == (
        "bfloat16 compute and weights; no loss scaling"
    )
    assert precision.uses_loss_scaling(_config("model.param_dtype=float16"))
    assert not precision.uses_loss_scaling(_config("model.dtype=float16", "train.loss_scale=none"))
    assert precision.uses_loss_scaling(_config("train.loss_scale=dynamic"))


def _scale_reference(overflows, init, period):
    """The scale after each step, from the steps' overflow flags, by the rule as written."""
    scale, good, out = init, 0, []
    for overflow in overflows:
        if overflow:
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good == period:
                scale, good = scale * 2, 0
        out.append(scale)
    return out


def test_a_float16_run_overflows_without_stopping_and_resumes_bitwise(
    tmp_path, stdlib_cache, capsys
):
    """A float16 run through the loop from a scale that overflows for several steps in a row,
    more than `max_nonfinite_steps`: it goes on, logs each overflow, and its logged scales
    follow the rule. Cut at step 6 and resumed, it ends bitwise equal to the whole run, scale
    included; the checkpoint holds the scaler; a resume with loss scaling off is refused."""
    cfg = _loop_config(
        "model.dtype=float16",
        "train.loss_scale_init=1048576",
        "train.loss_scale_period=3",
        "train.max_nonfinite_steps=2",
        "train.steps=12",
        "checkpoint.every=6",
    )
    whole = loop.train(cfg, tmp_path / "whole")["state"]
    records = [
        json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "loss_scale" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    overflows = [bool(r["overflow"]) for r in steps]
    assert overflows[:3] == [True] * 3, overflows  # three in a row: more than the streak limit
    assert [r["loss_scale"] for r in steps] == _scale_reference(overflows, 2.0**20, 3)
    assert "gradients overflowed at loss scale 1.04858e+06; update skipped, loss scale now " in (
        capsys.readouterr().err
    )

    loop.train(apply_overrides(cfg, ["train.steps=6"]), tmp_path / "cut")
    resumed = loop.train(cfg, tmp_path / "cut")["state"]
    _assert_trees_equal(resumed.params, whole.params)
    _assert_trees_equal(resumed.opt_state, whole.opt_state)
    _assert_trees_equal(resumed.loss_scale, whole.loss_scale)

    mesh = make_mesh(cfg.mesh)
    ckpt = checkpoint.Checkpointer(tmp_path / "cut", cfg.checkpoint, read_only=True)
    saved, _ = ckpt.restore(12, abstract_train_state(cfg, mesh))
    ckpt.close()
    _assert_trees_equal(saved.loss_scale, whole.loss_scale)

    with pytest.raises(ValueError, match=r"train\.loss_scale: saved 'auto', now 'none'"):
        loop.train(
            apply_overrides(cfg, ["train.loss_scale=none", "train.steps=14"]), tmp_path / "cut"
        )
