"""Faults in real processes: stop and resume, SIGTERM, kill -9 (also mid-save), all bitwise equal
to one uninterrupted run of the same command."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm import checkpoint
from jaxlm.run import abstract_train_state
from jaxlm.sharding import make_mesh

STEPS = 40
ARGS = [
    "--config",
    "tiny",
    "--set",
    "data.seq_len=64",
    "--set",
    "data.batch_size=8",
    "--set",
    f"optim.schedule_steps={STEPS}",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=1000",
    "--set",
    "train.eval_batches=1",
    "--set",
    "train.sample_tokens=0",
    "--set",
    "train.peak_flops_per_device=1e11",
    "--set",
    "checkpoint.every=4",
]


def _cmd(workdir, steps=STEPS):
    return [
        sys.executable,
        "-m",
        "jaxlm",
        "train",
        *ARGS,
        "--set",
        f"train.steps={steps}",
        "--workdir",
        str(workdir),
    ]


def _env(cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(cache)}
    env.pop("XLA_FLAGS", None)  # one device, like a user's first run
    return env


def _run(workdir, cache, steps=STEPS):
    out = subprocess.run(
        _cmd(workdir, steps), capture_output=True, text=True, timeout=600, env=_env(cache)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _start(workdir, cache, steps=STEPS):
    return subprocess.Popen(
        _cmd(workdir, steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cache),
    )


def _logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def _wait_for(condition, proc, timeout=300.0, poll=0.001):
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (
            f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        )
        assert time.monotonic() < end, "timed out"
        time.sleep(poll)


def _losses(workdir):
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _final_params(workdir):
    config = checkpoint.load_run_config(workdir)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == STEPS
    params = ckpt.restore_params(STEPS, abstract_train_state(config, mesh).params)
    ckpt.close()
    return jax.tree.map(np.asarray, jax.device_get(params))


def _assert_same_run(workdir, reference):
    ref_losses, ref_params = reference
    assert _losses(workdir) == ref_losses  # every step, bitwise, in order
    for a, b in zip(
        jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(ref_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir, cache)
    losses = _losses(workdir)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses, _final_params(workdir)


def test_stop_and_resume_in_a_new_process_is_bitwise_identical(reference, cache, tmp_path):
    _run(tmp_path, cache, steps=STEPS // 2)
    assert checkpoint.complete_steps(tmp_path)[-1] == STEPS // 2
    out = _run(tmp_path, cache)
    assert f"resumed from step {STEPS // 2}" in out.stderr
    _assert_same_run(tmp_path, reference)


def test_sigterm_saves_exits_zero_and_resumes(reference, cache, tmp_path):
    proc = _start(tmp_path, cache)
    _wait_for(lambda: _logged_steps(tmp_path) >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = checkpoint.complete_steps(tmp_path)[-1]
    assert 6 <= stopped < STEPS, stopped
    assert f"SIGTERM: saved step {stopped}" in err
    out = _run(tmp_path, cache)
    assert f"resumed from step {stopped}" in out.stderr
    _assert_same_run(tmp_path, reference)


def _tmp_dirs(workdir):
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if "tmp" in p.name]


def test_kill_9_at_any_moment_then_resume_ends_like_an_uninterrupted_run(
    reference, cache, tmp_path
):
    rng = random.Random(0)
    kills = []
    # Killed while an async save is being written (its temporary directory exists); the save
    # may still win the race to commit, so try until a kill lands mid-save (the process keeps
    # going on each retry, so these are random-moment kills as well).
    for _ in range(4):
        proc = _start(tmp_path, cache)
        _wait_for(lambda: _tmp_dirs(tmp_path), proc)
        proc.kill()
        proc.wait()
        kills.append(("save", [p.name for p in _tmp_dirs(tmp_path)]))
        if kills[-1][1]:
            break
    # Killed at random moments after a random number of steps; then SIGTERM twice in a row (the
    # second one aborts the save the first one started).
    for how in ("kill", "kill", "double-sigterm"):
        proc = _start(tmp_path, cache)
        done = _logged_steps(tmp_path)
        target = done + rng.randint(1, 8)
        _wait_for(lambda t=target: _logged_steps(tmp_path) >= t, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if how == "kill":
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.001)
            proc.send_signal(signal.SIGTERM)
        proc.wait()
        kills.append((how, proc.returncode, _logged_steps(tmp_path)))
    assert kills[-1][1] in (0, 128 + signal.SIGTERM), kills
    assert any(k[0] == "save" and k[1] for k in kills), kills
    out = _run(tmp_path, cache)
    assert "resumed from step" in out.stderr
    assert not _tmp_dirs(tmp_path)  # half-written saves were cleaned up, never restored
    _assert_same_run(tmp_path, reference)
