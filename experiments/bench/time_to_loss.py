"""Wall time to a held-out loss, and peak memory, of a whole `jaxlm train` run (start-up,
data preparation, compilation, training and the final evaluation included).

By default it runs `experiments/configs/tiny_shakespeare_char.py` on Karpathy's input.txt
(`--data-dir`, default `../shared/data/tiny_shakespeare`) without the closing sample; with
`--default-job` it runs the default `jaxlm train` job instead (stdlib corpus, sample included).
The dataset is prepared once beforehand (an untimed 1-step run, without the XLA compilation
cache), so the time is that of a run on a machine that already has the data; the timed run
starts from an empty XLA compilation cache (every program compiled, as on a first run), and
`--warm` adds a second run that reads that cache (as a resumed or repeated run does).

Prints one JSON object: `wall_s`, the final `eval_loss` (nats per token; a byte per token
here), `eval_bits_per_byte`, `steps`, `peak_rss_gb` (the run's process), and what that memory
is made of: `runtime_rss_gb` (a process that imports jaxlm and runs one jitted op: the Python
libraries and the XLA runtime), `arrays_gb` (the compiled train step's arguments, outputs and
temporaries, from XLA's memory analysis) and `peak_over_needed` = peak / (runtime + arrays);
`compile_rss_gb` is what compiling the train step adds to the runtime's peak (a process that
only compiles it, ahead of time, nothing created or run).

    python experiments/bench/time_to_loss.py [--data-dir DIR] [--default-job] [--warm]
        [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "tiny_shakespeare_char.py"


# Runs the command and prints its peak resident memory (KiB), so each run is measured alone.
_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _run(args: list[str], cache: str = "off", code: str | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of `python -m jaxlm *args` (or of `python -c code`),
    with the XLA compilation cache at `cache`."""
    command = ["-c", code] if code else ["-m", "jaxlm", *args]
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, *command],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "JAXLM_XLA_CACHE": cache},
    )
    return time.perf_counter() - start, int(out.stdout.split()[-1])


# The libraries and the runtime alone: what any jaxlm process holds before its arrays.
_RUNTIME = "import jax, jaxlm.cli; jax.jit(lambda x: x + 1)(jax.numpy.zeros(8)).block_until_ready()"

# The runtime plus compiling the run's train step (ahead of time: no array is created or run).
_COMPILE = _RUNTIME + (
    "; from jaxlm.configs.overrides import load_config; from jaxlm.run import RunPlan"
    "; from jaxlm.sharding import use_mesh; plan = RunPlan(load_config({spec!r}, {overrides!r}))"
    "; use_mesh(plan.mesh, plan.rules).__enter__()"
    "; plan.train_step.jitted.lower(plan.abstract_state, plan.abstract_batch()).compile()"
)


def _arrays_bytes(spec: str | None, overrides: list[str]) -> int:
    """Bytes of the train step's arguments + outputs (less those aliased, the donated state) +
    temporaries, by XLA's memory analysis of the step compiled here for the run's devices."""
    from jaxlm.configs.overrides import load_config
    from jaxlm.run import RunPlan
    from jaxlm.sharding import use_mesh

    plan = RunPlan(load_config(spec, overrides))
    with use_mesh(plan.mesh, plan.rules):
        compiled = plan.train_step.jitted.lower(plan.abstract_state, plan.abstract_batch())
        m = compiled.compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/tiny_shakespeare"))
    parser.add_argument("--default-job", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--warm", action="store_true", help="also time a warm-cache run")
    args = parser.parse_args()
    if args.default_job:
        base: list[str] = []
    else:
        if not (Path(args.data_dir) / "input.txt").is_file():
            parser.error(f"--data-dir {args.data_dir!r} holds no input.txt")
        base = ["--config", str(CONFIG), "--set", f"data.manual_dir={args.data_dir}"]
        base += ["--set", "train.sample_tokens=0"]
    for override in args.set:
        base += ["--set", override]
    with tempfile.TemporaryDirectory() as tmp:
        # Untimed: prepares the dataset (TFDS build, or the stdlib corpus) once.
        _run(["train", *base, "--set", "train.steps=1", "--workdir", f"{tmp}/prepare"])
        wall, peak_kb = _run(["train", *base, "--workdir", f"{tmp}/run"], cache=f"{tmp}/xla")
        lines = Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        warm = None
        if args.warm:
            warm, _ = _run(["train", *base, "--workdir", f"{tmp}/warm"], cache=f"{tmp}/xla")
        _, runtime_kb = _run([], code=_RUNTIME)
    records = [json.loads(line) for line in lines]
    final = [r for r in records if "eval_loss" in r][-1]
    spec = None if args.default_job else str(CONFIG)
    overrides = [x for x in base if x not in ("--config", str(CONFIG), "--set")]
    _, compiled_kb = _run([], code=_COMPILE.format(spec=spec, overrides=overrides))
    arrays = _arrays_bytes(spec, overrides)
    needed_kb = runtime_kb + arrays / 1024
    out = {
        "run": "default job" if args.default_job else CONFIG.name,
        "overrides": args.set,
        "wall_s": round(wall, 1),
        **({"wall_warm_cache_s": round(warm, 1)} if warm is not None else {}),
        "steps": final["step"],
        "eval_loss": round(final["eval_loss"], 4),
        "eval_bits_per_byte": round(final["eval_bits_per_byte"], 4),
        "eval_tokens": final["eval_tokens"],
        "peak_rss_gb": round(peak_kb / 2**20, 3),
        "runtime_rss_gb": round(runtime_kb / 2**20, 3),
        "arrays_gb": round(arrays / 2**30, 3),
        "peak_over_needed": round(peak_kb / needed_kb, 2),
        # What compiling costs on top of the runtime: the peak of a process that only compiles
        # the train step, less the runtime's.
        "compile_rss_gb": round((compiled_kb - runtime_kb) / 2**20, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
