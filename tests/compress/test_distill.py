"""task.kind=distill: the loss against a NumPy computation from both models' logits, a frozen
teacher that never moves nor enters the checkpoint, a student that learns more from the teacher
than from the data alone, and teachers that cannot teach this student refused."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, loop
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, to_global
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, load_for_eval
from jaxlm.tasks.distill import TEACHER, distill_kl_sums

STUDENT = [
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.mlp_dim=64",
    "model.num_layers=1",
    "data.seq_len=64",
    "data.batch_size=8",
    "optim.learning_rate=3e-3",
    "optim.warmup_steps=10",
    "train.sample_tokens=0",
    "train.log_every=50",
    "checkpoint.async_save=false",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, _session_cache):
    """A teacher much stronger than the student: d 128 (the student's 32), 2 layers (1),
    400 steps (the student's 80); held-out loss about 2.2 (the student alone: about 3.06)."""
    sets = [*STUDENT[5:], "model.d_model=128", "model.num_layers=2", "model.mlp_dim=512",
            "train.steps=400", "train.eval_every=400", "checkpoint.every=400",
            "optim.warmup_steps=20"]  # fmt: skip
    workdir = tmp_path_factory.mktemp("teacher") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        loop.train(load_config("tiny-llama", sets), workdir)
    return workdir


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_sums_match_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 2, 5, 11)).astype(np.float32) * 3
    mask = rng.random((2, 5)) > 0.3
    for temp in (1.0, 2.5):
        p, q = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
        want = np.sum(np.where(mask, np.sum(np.exp(p) * (p - q), -1), 0))
        got = distill_kl_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temp)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _config(teacher, *sets):
    return load_config(
        "tiny-llama",
        [*STUDENT, "task.kind=distill", f"task.teacher={teacher}", *sets],
    )


def test_the_step_minimises_alpha_t2_kl_plus_ce_and_leaves_the_teacher_alone(teacher, stdlib_cache):
    config = _config(teacher, "task.distill_alpha=0.7", "task.distill_temperature=3.0")
    plan = RunPlan(config)
    frozen = plan.frozen_inputs[TEACHER]
    before = jax.device_get(frozen)
    # sharded like the student: over the same mesh and rules (fsdp over 8 devices)
    up = frozen["layers"]["mlp"]["up"]["w"]
    assert up.sharding.mesh.shape == plan.mesh.shape and up.sharding.spec[1] == "fsdp"
    it = plan.make_iterator()
    batch = next(it)
    state = plan.init_state()
    params = jax.device_get(state.params)
    state, metrics = plan.train_step(state, to_global(batch, plan.mesh))

    # The same objective by NumPy from the two models' logits.
    def logits(model, p):
        out = Transformer(model).apply(
            {"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"]
        )[0]
        return np.asarray(out, np.float64)

    teacher_model = checkpoint.load_run_config(teacher).model
    s, t = logits(config.model, params), logits(teacher_model, before)
    mask, targets = np.asarray(batch["mask"]), np.asarray(batch["targets"])
    ls = _np_log_softmax(s)
    ce = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    p, q = _np_log_softmax(t / 3.0), _np_log_softmax(s / 3.0)
    kl = np.sum(np.exp(p) * (p - q), -1)
    n = mask.sum()
    z = np.square(np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1))
    hard = (ce * mask).sum() + config.train.z_loss * (z * mask).sum()
    want = (0.7 * 9.0 * (kl * mask).sum() + 0.3 * hard) / n
    np.testing.assert_allclose(float(metrics["distill_loss"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["distill_kl"]), (kl * mask).sum() / n, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), (ce * mask).sum() / n, rtol=1e-4)
    # The teacher: unchanged, not part of the student's state or optimizer.
    for a, b in zip(jax.tree.leaves(jax.device_get(frozen)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    assert TEACHER not in state.params and TEACHER not in jax.tree_util.keystr(state.opt_state)


def test_a_distilled_student_beats_the_same_student_trained_alone(teacher, stdlib_cache, tmp_path):
    steps = ["train.steps=80", "train.eval_every=80", "train.eval_batches=4"]
    alone = load_config("tiny-llama", [*STUDENT, *steps])
    taught = _config(teacher, *steps, "task.distill_alpha=0.9")
    loop.train(alone, tmp_path / "alone")
    loop.train(taught, tmp_path / "taught")
    held_out = {n: loop.eval_workdir(tmp_path / n, max_batches=8)["eval_loss"]
                for n in ("alone", "taught")}  # fmt: skip
    assert held_out["taught"] < held_out["alone"] - 0.04, held_out  # measured: 2.986, 3.059
    # The student's checkpoint holds the student only.
    cfg, _, params, _ = load_for_eval(tmp_path / "taught")
    assert TEACHER not in params and cfg.model.d_model == 32
    assert json.loads((tmp_path / "taught" / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize(
    "sets,error,match",
    [
        (["model.vocab_size=300"], ValueError, r"has another vocabulary \(vocab_size=320, the st"),
        (["data.seq_len=512", "model.max_seq_len=512"], ValueError, r"up to 128 tokens"),
        (["task.distill_alpha=1.5"], ValueError, r"distill_alpha=1.5 must be in \[0, 1\]"),
        (
            ["task.distill_temperature=0"],
            ValueError,
            r"distill_temperature=0.0 must be a finite number > 0",
        ),
    ],
)
def test_teachers_that_cannot_teach_are_refused(teacher, stdlib_cache, sets, error, match):
    with pytest.raises(error, match=match):
        RunPlan(_config(teacher, *sets))


def test_a_missing_teacher_is_refused(tmp_path, stdlib_cache):
    with pytest.raises(ValueError, match=r"task.kind=distill needs task.teacher=RUN"):
        RunPlan(load_config("tiny-llama", [*STUDENT, "task.kind=distill"]))
    with pytest.raises(FileNotFoundError, match=r"is not a directory"):
        RunPlan(_config(tmp_path / "nothing"))
    config = dataclasses.replace(load_config("tiny-llama", STUDENT))
    assert RunPlan(config, tokenizer=ByteTokenizer()).frozen_inputs is None
