"""Multi-process runs with real processes on loopback (CPU collectives through gloo).

Each run is `python -m jaxlm train` in 2 processes of 4 fake CPU devices each (8 global devices),
compared with the same config in 1 process of 8 devices. Every wait is bounded: a hang fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import checkpoint, storage
from jaxlm.configs.overrides import load_config
from jaxlm.run import abstract_train_state
from jaxlm.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--config",
    "tiny",
    "--set",
    "data.seq_len=32",
    "--set",
    "data.batch_size=8",
    "--set",
    "optim.schedule_steps=12",
    "--set",
    "checkpoint.every=4",
    "--set",
    "train.eval_every=1000",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.log_every=1",
]
TIMEOUT = 240  # seconds for any one run; a run that takes longer is a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    return env


def _start(
    workdir: Path | str,
    args: list[str],
    process: int | None,
    port: int = 0,
    devices: int = 4,
    logs: Path | None = None,
):
    """One `jaxlm train` process (process=None: a single-process run on 8 devices); its stderr
    goes to `<logs>/<workdir name>.<process>.log` (`logs`: default the workdir's parent)."""
    cmd = [sys.executable, "-m", "jaxlm", "train", "--workdir", str(workdir), *args]
    if process is not None:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd += ["--process-id", str(process), "--heartbeat-timeout", "10", "--init-timeout", "60"]
    name = str(workdir).rstrip("/").rsplit("/", 1)[-1]
    logs = logs or Path(workdir).parent
    log = logs / f"{name}.{'single' if process is None else process}.log"
    return subprocess.Popen(
        cmd,
        env=_env(8 if process is None else devices),
        stdout=subprocess.PIPE,
        stderr=open(log, "a"),
        text=True,
    )


def _finish(procs, timeout=TIMEOUT):
    """(exit code, stdout) of each process, killing all of them if any overruns `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not finish within {timeout} s (hang)")
        results.append((p.returncode, out))
    return results


def _printed_lines(text: str) -> list[str]:
    """The non-empty lines of a process's stdout other than Gloo's. Gloo (the CPU collectives
    library) prints "[Gloo] Rank r is connected to n peer ranks. ..." there, from several threads
    at once, so one message can be split over lines ("[Gloo] Rank 0 [Gloo] Rank 0 is connected
    ...\nis connected ...")."""
    gloo = ("[Gloo]", "peer ranks")
    return [x for x in text.splitlines() if x.strip() and not any(g in x for g in gloo)]


def _log(workdir: Path, process) -> str:
    return (workdir.parent / f"{workdir.name}.{process}.log").read_text()


def run_two(workdir: Path | str, *overrides: str, **kw):
    port = _free_port()
    args = [*RUN, *[x for o in overrides for x in ("--set", o)]]
    return _finish([_start(workdir, args, i, port, **kw) for i in range(2)])


def run_one(workdir: Path | str, *overrides: str, **kw):
    args = [*RUN, *[x for o in overrides for x in ("--set", o)]]
    return _finish([_start(workdir, args, None, **kw)])[0]


def _losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _params(workdir: Path, step: int):
    cfg = load_config("tiny", ["data.seq_len=32", "data.batch_size=8"])
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        params = ckpt.restore_params(step, abstract_train_state(cfg, make_mesh(cfg.mesh)).params)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, params)


def _assert_params_equal(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, 8 devices, 12 steps, 2 data streams: the run everything else must equal."""
    workdir = tmp_path_factory.mktemp("multihost") / "reference"
    rc, _ = run_one(workdir, "train.steps=12", "data.streams=2")
    assert rc == 0, _log(workdir, "single")
    return workdir


def test_two_processes_train_like_one_and_restore_on_either_count(reference, tmp_path):
    """2 processes == 1 process (losses and params); a 2-process checkpoint resumes in 1 process
    and a 1-process checkpoint in 2, both continuing exactly like the uninterrupted run."""
    expected = _losses(reference)

    # 2 processes for 8 steps (default data.streams: one per process, so 2 as the reference),
    # then 1 process to step 12 (which keeps the 2 saved streams).
    two = tmp_path / "two_then_one"
    results = run_two(two, "train.steps=8", "train.sample_tokens=8")
    assert [rc for rc, _ in results] == [0, 0], _log(two, 0) + _log(two, 1)
    losses = _losses(two)
    np.testing.assert_allclose(
        [losses[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5
    )
    # Written once: process 0 prints the progress and the sample, process 1 stays quiet.
    assert "step 8/8" in _log(two, 0) and "step 8/8" not in _log(two, 1)
    printed = [_printed_lines(out) for _, out in results]
    assert printed[0] and printed[0][0].startswith("def") and printed[1] == [], printed
    _assert_params_equal(_params(two, 8), _params(reference, 8))
    rc, _ = run_one(two, "train.steps=12")
    assert rc == 0, _log(two, "single")
    assert "resumed from step 8" in _log(two, "single")

    # 1 process for 8 steps (data.streams=2 as the reference), then 2 processes to step 12.
    one = tmp_path / "one_then_two"
    rc, _ = run_one(one, "train.steps=8", "data.streams=2")
    assert rc == 0, _log(one, "single")
    # ... on a mesh whose DCN axis spans the processes (fsdp = 2 processes x 4 devices).
    results = run_two(one, "train.steps=12", "data.streams=2", "mesh.dcn_fsdp=2")
    assert [rc for rc, _ in results] == [0, 0], _log(one, 0) + _log(one, 1)

    for workdir in (two, one):
        losses = _losses(workdir)
        assert sorted(losses) == list(range(1, 13))
        np.testing.assert_allclose(
            [losses[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-5
        )
        _assert_params_equal(_params(workdir, 12), _params(reference, 12))


def test_two_processes_save_to_a_bucket_and_one_process_resumes_from_it(
    reference, tmp_path, gcs_bucket
):
    """The cooperative save (each process writes its shards, process 0 commits) to a gs://
    workdir on the Cloud Storage emulator; 1 process resumes from the bucket and ends like the
    reference."""
    workdir = f"{gcs_bucket}/run"
    results = run_two(workdir, "train.steps=8", logs=tmp_path)
    logs = "".join((tmp_path / f"run.{i}.log").read_text() for i in (0, 1))
    assert [rc for rc, _ in results] == [0, 0], logs
    assert checkpoint.complete_steps(workdir) == [4, 8]
    rc, _ = run_one(workdir, "train.steps=12", logs=tmp_path)
    single = (tmp_path / "run.single.log").read_text()
    assert rc == 0, single
    assert f"resumed from step 8 in {workdir}/checkpoints" in single
    expected = _losses(reference)
    lines = (storage.as_path(workdir) / "metrics.jsonl").read_text().splitlines()
    losses = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    assert sorted(losses) == list(range(1, 13))
    np.testing.assert_allclose(
        [losses[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-5
    )
    _assert_params_equal(_params(workdir, 12), _params(reference, 12))


def _wait_for_checkpoint(workdir: Path, procs, after: int = 0, timeout: float = TIMEOUT):
    """Wait until a complete checkpoint of a step > `after` exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = checkpoint.complete_steps(workdir)
        if steps and steps[-1] > after:
            return steps
        if any(p.poll() is not None for p in procs):
            pytest.fail("a process exited before the first checkpoint")
        time.sleep(0.2)
    for p in procs:
        p.kill()
    pytest.fail(f"no checkpoint after {timeout} s")


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_kill_fails_fast(tmp_path):
    workdir = tmp_path / "run"
    args = [*RUN, "--set", "train.steps=2000", "--set", "train.sample_tokens=0"]

    # SIGTERM reaches only process 1: both save the same step and exit 0.
    port = _free_port()
    procs = [_start(workdir, args, i, port) for i in range(2)]
    _wait_for_checkpoint(workdir, procs)
    procs[1].send_signal(signal.SIGTERM)
    assert [rc for rc, _ in _finish(procs, timeout=120)] == [0, 0], _log(workdir, 0)
    stopped = checkpoint.complete_steps(workdir)[-1]
    assert f"SIGTERM: saved step {stopped}" in _log(workdir, 0)

    # kill -9 of process 1: process 0 fails within the heartbeat timeout (10 s) plus slack.
    port = _free_port()
    procs = [_start(workdir, args, i, port) for i in range(2)]
    _wait_for_checkpoint(workdir, procs, after=stopped)
    procs[1].kill()
    killed_at = time.monotonic()
    try:
        procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still runs 90 s after process 1 was killed")
    assert procs[0].returncode != 0
    assert time.monotonic() - killed_at < 90
    for p in procs:
        p.communicate()

    # Both restarted: resume from the newest complete checkpoint and finish.
    last = checkpoint.complete_steps(workdir)[-1]
    results = run_two(workdir, f"train.steps={last + 3}", "train.sample_tokens=0")
    assert [rc for rc, _ in results] == [0, 0], _log(workdir, 0)
    assert f"resumed from step {last}" in _log(workdir, 0).split("SIGTERM")[-1]
    assert checkpoint.complete_steps(workdir)[-1] == last + 3


@pytest.mark.parametrize(
    "what, expected",
    [("config", "(config: process 0 '"), ("devices", "(local_devices: process 0 4, process 1 3)")],
)
def test_processes_that_disagree_fail_with_a_clear_error(tmp_path, what, expected):
    port = _free_port()
    workdir = tmp_path / "run"
    procs = [
        _start(
            workdir,
            [*RUN, "--set", f"train.steps={4 + i * (what == 'config')}"],
            i,
            port,
            devices=4 - i * (what == "devices"),
        )
        for i in range(2)
    ]
    results = _finish(procs, timeout=120)
    assert [rc for rc, _ in results] == [2, 2]
    for i in range(2):
        log = _log(workdir, i)
        assert f"the 2 processes of this run disagree {expected}" in log, log
    assert not checkpoint.complete_steps(workdir)


def _eval(workdir: Path, args: list[str], process: int | None, port: int = 0):
    """One `jaxlm eval` process (process=None: one process on 8 devices)."""
    cmd = [sys.executable, "-m", "jaxlm", "eval", "--workdir", str(workdir), *args]
    if process is not None:
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        cmd += ["--process-id", str(process), "--heartbeat-timeout", "10", "--init-timeout", "60"]
    log = workdir.parent / f"eval.{'single' if process is None else process}.log"
    env = _env(8 if process is None else 4)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True)


def test_harness_tasks_on_two_processes_equal_one(reference, tmp_path):
    """`jaxlm eval --tasks` with the parameters spread over 2 processes: the same results as
    one process (multiple choice through shared contexts, and generation); one file, one
    printout."""
    from jaxlm.evals.harness import write_task
    from tests.evals.test_harness import MC_DOCS, mc_task

    mc = mc_task(
        tmp_path,
        "mh_mc",
        MC_DOCS,
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )
    gen = write_task(
        tmp_path,
        "mh_gen",
        [{"q": d["q"], "a": d["choices"][0]} for d in MC_DOCS[:4]],
        output_type="generate_until",
        doc_to_text="{{q}}",
        doc_to_target="{{a}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 5},
        metric_list=[{"metric": "exact_match"}],
    )
    tasks = ["--tasks", f"{mc},{gen}", "--num-fewshot", "1", "--batch-size", "8"]
    single = tmp_path / "single.json"
    ((rc, _),) = _finish([_eval(reference, [*tasks, "--output", str(single)], None)])
    assert rc == 0, (reference.parent / "eval.single.log").read_text()
    two = tmp_path / "two.json"
    port = _free_port()
    results = _finish([_eval(reference, [*tasks, "--output", str(two)], i, port) for i in (0, 1)])
    logs = [(reference.parent / f"eval.{i}.log").read_text() for i in (0, 1)]
    assert [rc for rc, _ in results] == [0, 0], logs
    printed = [_printed_lines(out) for _, out in results]
    assert len(printed[0]) == 1 and printed[1] == [], printed
    a, b = json.loads(single.read_text()), json.loads(two.read_text())
    assert a["results"] == b["results"]
    assert json.loads(printed[0][0])["mh_mc/acc"] == a["results"]["mh_mc"]["acc,none"]
