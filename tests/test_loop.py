"""End to end: `jaxlm train` writes metrics and checkpoints and resumes; `jaxlm eval` agrees."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxlm.configs.overrides import load_config

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments" / "configs").glob("*.py"))
METRIC_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "param_norm",
    "tokens_per_sec",
    "mfu",
    "model_flops_per_sec",
    "bits_per_byte",
    "tokens",
    "z_loss",
}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_config_loads(path):
    config = load_config(str(path))
    assert config.model.vocab_size >= 259


def _jaxlm(*args, cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(cache)}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's first run has
    return subprocess.run(
        [sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    workdir = root / "work"
    common = [
        "--set",
        "train.eval_every=20",
        "--set",
        "train.log_every=5",
        "--set",
        "train.eval_batches=4",
        "--set",
        "train.sample_tokens=16",
        "--set",
        "checkpoint.every=20",
        "--workdir",
        str(workdir),
    ]
    began = time.perf_counter()
    first = _jaxlm("train", "--set", "train.steps=40", *common, cache=root / "cache")
    first.wall_time = time.perf_counter() - began
    assert first.returncode == 0, first.stderr[-3000:]
    return root, workdir, first, common


def test_default_job_learns_and_logs_documented_metrics(run):
    _, workdir, out, _ = run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert set(train[0]) >= METRIC_KEYS, set(train[0])
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    # Byte-level stdlib text: from ln(320) = 5.77 to below 3.5 within 40 steps of the small model.
    assert train[0]["loss"] > 4.5 and train[-1]["loss"] < 3.5, [r["loss"] for r in train]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # Each logged rate covers the steps since the previous logged one (step 1, the compile, is
    # left out), so their times add up to less than the whole run took; MFU stays below 1 on
    # every step, eval and checkpoint steps (20, 40) included.
    assert all(0 < r["mfu"] < 1 for r in train), [r["mfu"] for r in train]
    data = load_config(None).data  # the default job's
    tokens = data.batch_size * data.seq_len
    covered = [4] + [5] * (len(train) - 1)
    seconds = sum(n * tokens / r["tokens_per_sec"] for n, r in zip(covered, train, strict=True))
    assert seconds < out.wall_time
    assert "step 1: compiled and ran in" in out.stderr
    assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())
    assert out.stdout.strip().startswith("def")  # the sample: prompt + greedy continuation


def test_eval_restores_the_checkpoint_and_reproduces_the_logged_eval(run):
    root, workdir, _, _ = run
    out = _jaxlm("eval", "--workdir", str(workdir), "--batches", "4", cache=root / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "eval_loss" in r][-1]
    assert result["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    assert result["eval_bits_per_byte"] == pytest.approx(last["eval_bits_per_byte"], rel=1e-5)


def test_rerun_resumes_from_the_newest_checkpoint(run):
    root, workdir, _, common = run
    out = _jaxlm("train", "--set", "train.steps=50", *common, cache=root / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 40" in out.stderr
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 50 and 45 in steps


def test_resuming_with_a_different_model_is_refused_and_changes_nothing(run):
    root, workdir, _, common = run
    saved = (workdir / "config.json").read_text()
    out = _jaxlm(
        "train",
        "--set",
        "model.num_layers=3",
        "--set",
        "data.seq_len=64",
        *common,
        cache=root / "cache",
    )
    assert out.returncode == 2
    assert "cannot resume with this config" in out.stderr
    assert "data.seq_len: saved 128, now 64; model.num_layers: saved 4, now 3" in out.stderr
    assert (workdir / "config.json").read_text() == saved


def test_bad_run_configs_fail_before_training(tmp_path):
    out = _jaxlm(
        "train",
        "--set",
        "model.vocab_size=200",
        "--workdir",
        str(tmp_path / "w"),
        cache=tmp_path / "cache",
    )
    assert out.returncode == 2
    assert "model.vocab_size=200 is smaller than the tokenizer's 259 ids" in out.stderr
    assert not (tmp_path / "w").exists()


def test_sample_cli_reproduces_the_training_sample_and_is_seeded(run):
    root, workdir, first, _ = run

    def sample(*args):
        out = _jaxlm("sample", "--workdir", str(workdir), *args, cache=root / "cache")
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    # The step-40 checkpoint, sampled as the training run samples (temperature 0.8, top-p 0.95,
    # the run's seed 0) = the sample that run printed at step 40; greedy is another text.
    closing = ("--step", "40", "--prompt", "def ", "--max-new-tokens", "16")
    assert (
        sample(*closing, "--temperature", "0.8", "--top-p", "0.95", "--seed", "0") == first.stdout
    )
    assert sample(*closing, "--temperature", "0") != first.stdout
    args = (
        "--prompt",
        "import ",
        "--max-new-tokens",
        "24",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
    )
    a = sample(*args, "--seed", "1")
    assert a.startswith("import ") and a == sample(*args, "--seed", "1", "--stream")
    many = sample(*args, "--seed", "1", "--num-samples", "2", "--prompt", "class ")
    assert many.count("=== prompt") == 4 and "=== prompt 2, sample 2 ===\nclass " in many


@pytest.mark.parametrize(
    "args, message",
    [
        (("--prompt", "x", "--top-p", "1.5"), r"top_p=1.5 must be in (0, 1]"),
        (("--prompt", "x", "--top-k", "0"), "top_k=0 must be an integer >= 1"),
        (("--prompt", "x", "--temperature", "-1"), "temperature=-1.0 must be finite and >= 0"),
        (("--prompt", ""), "prompt 0 is empty"),
        (("--prompt", "x" * 200, "--max-new-tokens", "100"), "more than model.max_seq_len=256"),
    ],
    ids=["top_p", "top_k", "temperature", "empty", "too_long"],
)
def test_sample_cli_refuses_bad_requests(run, args, message):
    root, workdir, _, _ = run
    out = _jaxlm("sample", "--workdir", str(workdir), *args, cache=root / "cache")
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
