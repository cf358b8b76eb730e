"""Checkpoints in one process: restore onto other meshes, params only, damaged checkpoints,
retention, non-finite steps, and workdirs that cannot be written."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, loop, metrics, run
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.run import abstract_train_state, init_train_state, make_train_step
from jaxlm.sharding import make_mesh
from jaxlm.tasks import lm as lm_task

TOK = ByteTokenizer()
DOCS = [f"def g{i}(y):\n    return y - {i} * {i % 5}\n" * (1 + i % 4) for i in range(64)]
FILES = checkpoint.tokenizer_files(TOK)


def _config(*overrides):
    return load_config(
        "tiny",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "optim.schedule=constant",
            "optim.warmup_steps=0",
            "train.steps=20",
            *overrides,
        ],
    )


def _batches(cfg, n):
    ds = build_dataset(DOCS, TOK, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=0)
    it = DataIterator(ds)
    return [next(it) for _ in range(n)]


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(_host(a)), jax.tree.leaves(_host(b)), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


SAVE_CFG = _config("mesh.fsdp=8", "mesh.rules=fsdp")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state after two steps on 8 devices (fsdp), saved at step 2, and the loss of step 3."""
    workdir = tmp_path_factory.mktemp("saved")
    mesh = make_mesh(SAVE_CFG.mesh)
    state = init_train_state(SAVE_CFG, mesh, 0)
    step = make_train_step(SAVE_CFG, mesh)
    batches = _batches(SAVE_CFG, 3)
    for b in batches[:2]:
        state, _ = step(state, to_global(b, mesh))
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.save(2, state, {"position": 7}, SAVE_CFG, FILES)
    ckpt.wait()
    ckpt.close()
    host_state = _host(state)
    _, m = step(state, to_global(batches[2], mesh))
    return workdir, host_state, float(m["loss"]), batches[2]


@pytest.mark.parametrize(
    "mesh_overrides, num_devices",
    [
        (("mesh.fsdp=1", "mesh.rules=fsdp"), 1),
        (("mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp"), 8),
        (("mesh.data=8", "mesh.fsdp=1", "mesh.rules=dp"), 8),
    ],
    ids=["1-device", "fsdp4xtensor2", "data8"],
)
def test_restore_onto_another_mesh_gives_the_same_state_and_next_loss(
    saved, mesh_overrides, num_devices
):
    workdir, host_state, next_loss, next_batch = saved
    cfg = _config(*mesh_overrides)
    mesh = make_mesh(cfg.mesh, jax.devices()[:num_devices])
    target = abstract_train_state(cfg, mesh)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    state, data_state = ckpt.restore(2, target)
    ckpt.close()
    assert data_state == {"position": 7}
    _assert_trees_equal(state, host_state)
    # Each array arrives in the target mesh's sharding (not whole on one device).
    for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert x.sharding.is_equivalent_to(t.sharding, x.ndim), (x.sharding, t.sharding)
    _, m = make_train_step(cfg, mesh)(state, to_global(next_batch, mesh))
    assert float(m["loss"]) == pytest.approx(next_loss, abs=1e-5)


def test_params_only_restore_reads_no_optimizer_state(saved, tmp_path):
    workdir, host_state, _, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "2" / "train")  # optimizer state gone
    mesh = make_mesh(_config("mesh.fsdp=2", "mesh.tensor=4", "mesh.rules=fsdp_tp").mesh)
    cfg = _config("mesh.fsdp=2", "mesh.tensor=4", "mesh.rules=fsdp_tp")
    ckpt = checkpoint.Checkpointer(copy, read_only=True)
    params = ckpt.restore_params(2, abstract_train_state(cfg, mesh).params)
    assert ckpt.restore_json(2, "config") == json.loads(
        (copy / "checkpoints/2/config/metadata").read_text()
    )
    ckpt.close()
    _assert_trees_equal(params, host_state.params)


def test_a_checkpoint_holds_its_config_and_tokenizer(saved, tmp_path):
    workdir, host_state, _, _ = saved
    (workdir / checkpoint.CONFIG_FILE).unlink(missing_ok=True)  # only the checkpoint is left
    config, mesh, params, tokenizer = run.load_for_eval(workdir)
    assert config == SAVE_CFG
    assert tokenizer.encode("héllo") == TOK.encode("héllo")
    assert mesh.devices.size == jax.device_count()
    _assert_trees_equal(params, host_state.params)


def _corrupt(step_dir):
    """Truncate every array data file of the params item to half its length."""
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = _config("mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, 0)
    step = make_train_step(cfg, mesh)
    ckpt = checkpoint.Checkpointer(tmp_path)
    states = {}
    for i, b in enumerate(_batches(cfg, 2), start=1):
        state, _ = step(state, to_global(b, mesh))
        states[i] = _host(state)
        ckpt.save(i, state, {"i": i}, cfg, FILES)
    ckpt.wait()
    ckpt.close()
    _corrupt(tmp_path / "checkpoints" / "2")

    messages = []
    ckpt = checkpoint.Checkpointer(tmp_path)
    target = abstract_train_state(cfg, mesh)
    step_restored, (restored, data) = ckpt.restore_latest(
        lambda s: ckpt.restore(s, target), messages.append
    )
    assert step_restored == 1 and data == {"i": 1}
    _assert_trees_equal(restored, states[1])
    assert len(messages) == 1 and "checkpoint at step 2 cannot be restored" in messages[0]
    # The damaged one is kept aside, and step 2 can be written again.
    assert ckpt.all_steps() == [1]
    assert (tmp_path / checkpoint.QUARANTINE_DIR / "2").is_dir()
    ckpt.save(2, restored, {"i": 2}, cfg, FILES)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]

    # When nothing restores (here: another model's shapes), that is a mismatch, not damage:
    # an error, and every checkpoint stays where it is.
    other = abstract_train_state(_config("mesh.fsdp=8", "model.d_model=48"), mesh)
    with pytest.raises(RuntimeError, match=r"no checkpoint .* can be restored \(steps \[2, 1\]\)"):
        ckpt.restore_latest(lambda s: ckpt.restore(s, other), messages.append)
    assert ckpt.all_steps() == [1, 2] and len(messages) == 1
    ckpt.close()


def test_keep_last_k_plus_every_period(tmp_path):
    cfg = _config(
        "mesh.fsdp=8", "checkpoint.every=1", "checkpoint.keep=2", "checkpoint.keep_period=4"
    )
    state = init_train_state(cfg, make_mesh(cfg.mesh), 0)
    ckpt = checkpoint.Checkpointer(tmp_path, cfg.checkpoint)
    for i in range(1, 11):
        ckpt.save(i, state, {}, cfg, FILES)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    assert checkpoint.complete_steps(tmp_path) == [4, 8, 9, 10]
    ckpt.close()


def test_a_non_finite_step_is_skipped_and_counted():
    cfg = _config("mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh)
    step = make_train_step(cfg, mesh)
    good, other = _batches(cfg, 2)
    poisoned = dict(other, tokens=other["tokens"].copy())
    poisoned["tokens"][3, 5] = cfg.model.vocab_size  # out of the table: NaN embedding
    start = _host(init_train_state(cfg, mesh, 0))

    state, m = step(init_train_state(cfg, mesh, 0), to_global(poisoned, mesh))
    assert not np.isfinite(float(m["loss"])) and float(m["skipped"]) == 1
    after_bad = _host(state)
    _assert_trees_equal(after_bad.params, start.params)
    _assert_trees_equal(after_bad.opt_state, start.opt_state)
    assert (after_bad.step, after_bad.nonfinite_streak, after_bad.nonfinite_total) == (1, 1, 1)

    # A good step after the skipped one equals the same good step taken first (constant lr).
    state, m = step(state, to_global(good, mesh))
    assert float(m["skipped"]) == 0 and int(state.nonfinite_streak) == 0
    assert int(state.nonfinite_total) == 1
    reference, _ = step(init_train_state(cfg, mesh, 0), to_global(good, mesh))
    _assert_trees_equal(state.params, reference.params)
    _assert_trees_equal(state.opt_state, reference.opt_state)


class _Poison:
    """Wraps the loop's train iterator: the batches of the given steps get an out-of-vocab id."""

    def __init__(self, it, steps, vocab):
        self._it, self._steps, self._vocab, self._n = it, steps, vocab, 0

    def __next__(self):
        batch = next(self._it)
        self._n += 1
        if self._n in self._steps:
            batch = dict(batch, tokens=batch["tokens"].copy())
            batch["tokens"][0, 0] = self._vocab
        return batch

    def __getattr__(self, name):  # rows, global_batch, get_state, set_state, ...
        return getattr(self._it, name)


def _loop_config(*overrides):
    return load_config(
        "tiny",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "train.steps=8",
            "train.eval_every=1000",
            "train.eval_batches=1",
            "train.log_every=1",
            "train.sample_tokens=0",
            "train.peak_flops_per_device=1e11",
            "checkpoint.every=2",
            *overrides,
        ],
    )


def _poison_iterators(monkeypatch, steps, vocab):
    # The LM task builds its batches with this function (train split: no `split` argument).
    real = lm_task.make_iterator

    def make(*args, **kwargs):
        it = real(*args, **kwargs)
        return it if kwargs.get("split") else _Poison(it, steps, vocab)

    monkeypatch.setattr(lm_task, "make_iterator", make)


def test_loop_skips_a_poisoned_batch_and_stops_on_a_streak(tmp_path, monkeypatch, stdlib_cache):
    cfg = _loop_config("train.max_nonfinite_steps=3")
    _poison_iterators(monkeypatch, {3}, cfg.model.vocab_size)
    out = loop.train(cfg, tmp_path / "one")
    records = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in records if "skipped" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0}
    assert records[-2]["nonfinite_total"] == 1 and out["step"] == 8

    # Steps 5, 6, 7 poisoned: the run stops after step 7, before the step-8 save, and every
    # checkpoint on disk has finite parameters.
    _poison_iterators(monkeypatch, {5, 6, 7}, cfg.model.vocab_size)
    with pytest.raises(loop.NonFiniteError, match="3 consecutive steps"):
        loop.train(cfg, tmp_path / "two")
    steps = checkpoint.complete_steps(tmp_path / "two")
    assert steps == [4, 6], steps
    ckpt = checkpoint.Checkpointer(tmp_path / "two", read_only=True)
    mesh = make_mesh(cfg.mesh)
    for s in steps:
        params = ckpt.restore_params(s, abstract_train_state(cfg, mesh).params)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    ckpt.close()


def test_unwritable_or_full_workdirs_fail_before_training(tmp_path, monkeypatch):
    cfg = _loop_config()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"cannot write to workdir .*a-file/run"):
        loop.train(cfg, blocker / "run")
    with pytest.raises(ValueError, match="cannot write to workdir '/sys/jaxlm-test'"):
        checkpoint.check_workdir("/sys/jaxlm-test", 1)

    class Usage:
        free = 1000

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match=r"has 0.0 MiB free but the run's checkpoints need about"):
        loop.train(cfg, tmp_path / "full")
    assert not (tmp_path / "full").exists()


def test_drop_records_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "lo')
    metrics.drop_records_after(path, 1)
    assert path.read_text() == '{"step": 1, "loss": 3}\n'
