"""gs:// run directories, against a Cloud Storage emulator on 127.0.0.1 (tests/gcs_emulator.py):
train, stop and resume, kill -9 mid-save, a damaged checkpoint, sampling; each run is checked
bitwise against the same command run on local disk."""

import json
import subprocess
import sys
import time

import gcsfs
import jax
import numpy as np
import pytest

from jaxlm import checkpoint, cli, loop
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.run import abstract_train_state
from jaxlm.sharding import make_mesh
from tests.test_faults import ARGS, _env

STEPS = 12
RUN_ARGS = [
    *[a.replace("optim.schedule_steps=40", f"optim.schedule_steps={STEPS}") for a in ARGS],
    "--set",
    "checkpoint.keep=2",
]
assert f"optim.schedule_steps={STEPS}" in RUN_ARGS  # test_faults' schedule replaced, not kept


@pytest.fixture(scope="module")
def bucket_env(_gcs_emulator):
    """The emulator's variables set in this process (for gcsfs and Orbax here) for the module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _gcs_emulator.env().items():
            mp.setenv(k, v)
        yield _gcs_emulator


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cmd(workdir, steps):
    return [sys.executable, "-m", "jaxlm", "train", *RUN_ARGS, "--set", f"train.steps={steps}",
            "--workdir", str(workdir)]  # fmt: skip


def _run(workdir, cache, steps=STEPS):
    out = subprocess.run(
        _cmd(workdir, steps), capture_output=True, text=True, timeout=600, env=_env(cache)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _fs():
    fs = gcsfs.GCSFileSystem()
    fs.invalidate_cache()
    return fs


def _losses(text):
    records = [json.loads(x) for x in text.splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _params(workdir, step):
    config = checkpoint.load_run_config(workdir)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    params = ckpt.restore_params(step, abstract_train_state(config, mesh).params)
    ckpt.close()
    return jax.tree.map(np.asarray, jax.device_get(params))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The run on local disk: every step's loss and the final parameters."""
    workdir = tmp_path_factory.mktemp("disk")
    _run(workdir, cache)
    losses = _losses((workdir / "metrics.jsonl").read_text())
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses, _params(workdir, STEPS), workdir


@pytest.fixture(scope="module")
def bucket_run(bucket_env, cache):
    """The same run in a bucket, stopped at step 6 and resumed in a new process."""
    workdir = f"gs://{bucket_env.new_bucket()}/run"
    _run(workdir, cache, steps=STEPS // 2)
    out = _run(workdir, cache)
    return workdir, out


def test_a_run_in_a_bucket_resumes_and_matches_the_run_on_disk(reference, bucket_run, cache):
    workdir, out = bucket_run
    assert f"resumed from step {STEPS // 2} in {workdir}/checkpoints" in out.stderr
    assert "its free space is not checked" in out.stderr
    fs = _fs()
    path = workdir.removeprefix("gs://")
    assert _losses(fs.cat(f"{path}/metrics.jsonl").decode()) == reference[0]  # bitwise
    assert checkpoint.complete_steps(workdir) == [8, 12]  # checkpoint.keep=2 in the bucket
    _assert_same(_params(workdir, STEPS), reference[1])
    names = {p.removeprefix(path + "/") for p in fs.find(path)}
    assert {"config.json", "tokenizer/jaxlm_tokenizer.json"} <= names
    assert checkpoint.load_run_config(workdir).train.steps == STEPS
    text = "def f(x):\n    return x  # ü"
    ids = load_tokenizer(f"{workdir}/tokenizer").encode(text)
    assert ids == load_tokenizer(reference[2] / "tokenizer").encode(text)
    assert sum(n.startswith("tensorboard/events.out.tfevents") for n in names) == 2
    # Evaluation reads the bucket's run: the same figures as the run on disk's.
    got, want = loop.eval_workdir(workdir, max_batches=1), loop.eval_workdir(reference[2], 1)
    assert got == want and got["eval_tokens"] > 0
    # `jaxlm sample` on the bucket's run prints what it prints on the run on disk.
    texts = []
    for where in (workdir, reference[2]):
        cmd = [sys.executable, "-m", "jaxlm", "sample", "--workdir", str(where), "--prompt",
               "def ", "--max-new-tokens", "12", "--seed", "3"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(cache))
        assert out.returncode == 0, out.stderr[-3000:]
        texts.append(out.stdout)
    assert texts[0] == texts[1] and len(texts[0]) > len("def ")


def test_a_damaged_object_in_the_newest_checkpoint_falls_back_to_the_one_before(
    reference, bucket_run, cache
):
    workdir, _ = bucket_run
    fs = _fs()
    manifest = f"{workdir.removeprefix('gs://')}/checkpoints/12/params/manifest.ocdbt"
    fs.pipe(manifest, b"not a manifest")
    out = _run(workdir, cache, steps=STEPS + 4)  # a longer run (the schedule stays 12 steps)
    assert "checkpoint at step 12 cannot be restored" in out.stderr, out.stderr[-3000:]
    assert "moved it to corrupt_checkpoints/ and resumed from step 8" in out.stderr
    assert _fs().exists(f"{workdir.removeprefix('gs://')}/corrupt_checkpoints/12/params")
    assert checkpoint.complete_steps(workdir) == [12, 16]
    text = _fs().cat(f"{workdir.removeprefix('gs://')}/metrics.jsonl").decode()
    assert _losses(text)[:STEPS] == reference[0]  # steps 9-12 trained again, bitwise
    _assert_same(_params(workdir, STEPS), reference[1])


def test_bad_bucket_paths_fail_before_anything_runs(bucket_env, cache, capsys):
    assert cli.main(["train", "--config", "tiny", "--workdir", "s3://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert "'s3://bucket/run': s3:// paths are not supported" in err
    out = subprocess.run(
        _cmd("gs://no-such-bucket/run", 2), capture_output=True, text=True, timeout=300,
        env=_env(cache),
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot write to workdir 'gs://no-such-bucket/run'" in out.stderr
    assert "step 1/" not in out.stderr


def _tmp_steps(workdir):
    """Steps whose checkpoint is being written in the bucket (objects, no commit marker yet)."""
    fs = _fs()
    directory = f"{workdir.removeprefix('gs://')}/checkpoints"
    if not fs.exists(directory):
        return []
    steps = [p.rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)]
    return [s for s in steps if not fs.exists(f"{directory}/{s}/commit_success.txt")]


def test_kill_9_mid_save_to_a_bucket_then_resume_matches_the_run_on_disk(
    reference, bucket_env, cache
):
    workdir = f"gs://{bucket_env.new_bucket()}/run"
    killed_mid_save = []
    for _ in range(3):
        proc = subprocess.Popen(
            _cmd(workdir, STEPS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=_env(cache),
        )  # fmt: skip
        end = time.monotonic() + 300
        while not (pending := _tmp_steps(workdir)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        if _tmp_steps(workdir):
            killed_mid_save.append(pending)
            break
    assert killed_mid_save, "every kill came after the save committed"
    out = _run(workdir, cache)
    assert "resumed from step" in out.stderr or "step 1/" in out.stderr
    assert not _tmp_steps(workdir)  # the half-written save was removed, never restored
    text = _fs().cat(f"{workdir.removeprefix('gs://')}/metrics.jsonl").decode()
    assert _losses(text) == reference[0]
    _assert_same(_params(workdir, STEPS), reference[1])
