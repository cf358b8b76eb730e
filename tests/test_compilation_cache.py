"""The persistent XLA compilation cache the CLI turns on: written by one process, read back by
the next, computing exactly what a fresh compile computes; off when asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from jaxlm import compilation_cache

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    *("--config", "tiny", "--set", "data.seq_len=32", "--set", "data.batch_size=8"),
    *("--set", "train.steps=3", "--set", "train.log_every=1", "--set", "train.eval_batches=1"),
    *("--set", "train.sample_tokens=0", "--set", "train.peak_flops_per_device=1e11"),
]


def _train(workdir, cache, **env):
    out = subprocess.run(
        [sys.executable, "-m", "jaxlm", "train", "--workdir", str(workdir), *ARGS],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT),
            compilation_cache.ENV: str(cache),
            **env,
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return out.stderr, [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]


def test_a_second_process_reads_the_first_ones_programs_and_computes_the_same(
    tmp_path, stdlib_cache
):
    cache = tmp_path / "xla"
    _, first = _train(tmp_path / "a", cache)
    names = {p.name.split("-")[0] for p in cache.iterdir()}
    assert {"jit_train_step", "jit_eval_step"} <= names, names
    # JAX logs each hit as a warning when it logs compiles.
    log, second = _train(tmp_path / "b", cache, JAX_LOG_COMPILES="1")
    assert "Persistent compilation cache hit for 'jit_train_step'" in log
    assert "Persistent compilation cache hit for 'jit_eval_step'" in log
    assert second == first  # losses bitwise equal to those of the freshly compiled programs


def test_off_leaves_jax_as_it_was_and_a_path_wins(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.enable() is None
    assert jax.config.jax_compilation_cache_dir == before
    try:
        assert compilation_cache.enable(tmp_path / "x") == str(tmp_path / "x")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "x")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_directory_that_cannot_be_written_is_named_and_left_off(tmp_path, capsys):
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert compilation_cache.enable(blocker / "xla") is None
    assert jax.config.jax_compilation_cache_dir == before
    err = capsys.readouterr().err
    assert str(blocker / "xla") in err and "cannot be written" in err


_HEAP = """
import json
from jaxlm.compilation_cache import return_free_heap

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

before = rss_mb()
blocks = [bytes(1000) + bytes([i % 256]) for i in range(300_000)]  # ~300 MB of malloc'd blocks
kept = blocks[::64]  # a few stay alive all over the heap, so glibc cannot shrink its top
del blocks
freed = rss_mb()
trimmed = return_free_heap()
print(json.dumps({"before": before, "freed": freed, "after": rss_mb(), "trimmed": trimmed}))
"""


def test_return_free_heap_gives_freed_heap_back_to_the_system():
    """Heap freed between live blocks stays resident under glibc until `malloc_trim`; after
    `return_free_heap` the process's resident memory falls back near where it started."""
    out = subprocess.run(
        [sys.executable, "-c", _HEAP], capture_output=True, text=True, check=True, timeout=120
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["trimmed"]
    assert m["freed"] - m["before"] > 200, m  # freed, but still resident
    assert m["freed"] - m["after"] > 200, m  # given back
