"""Wall time to a held-out loss, and peak memory, of a whole `jaxlm train` run (start-up,
data preparation, compilation, training and the final evaluation included).

By default it runs `experiments/configs/tiny_shakespeare_char.py` on Karpathy's input.txt
(`--data-dir`, default `../shared/data/tiny_shakespeare`) without the closing sample; with
`--default-job` it runs the default `jaxlm train` job instead (stdlib corpus, sample included).
The dataset is prepared once beforehand (an untimed 1-step run), so the time is that of a run on
a machine that already has it. Prints one JSON object: `wall_s`, the final `eval_loss` (nats per
token; a byte per token here), `eval_bits_per_byte`, `steps`, `peak_rss_gb` (the run's process).

    python experiments/bench/time_to_loss.py [--data-dir DIR] [--default-job] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
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


def _run(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of `python -m jaxlm *args`."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, "-m", "jaxlm", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/tiny_shakespeare"))
    parser.add_argument("--default-job", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
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
        wall, peak_kb = _run(["train", *base, "--workdir", f"{tmp}/run"])
        lines = Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    final = [r for r in records if "eval_loss" in r][-1]
    print(
        json.dumps(
            {
                "run": "default job" if args.default_job else CONFIG.name,
                "overrides": args.set,
                "wall_s": round(wall, 1),
                "steps": final["step"],
                "eval_loss": round(final["eval_loss"], 4),
                "eval_bits_per_byte": round(final["eval_bits_per_byte"], 4),
                "eval_tokens": final["eval_tokens"],
                "peak_rss_gb": round(peak_kb / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
