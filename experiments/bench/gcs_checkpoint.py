"""Checkpoint save and restore time: a bucket (the Cloud Storage emulator on 127.0.0.1) against
local disk, for the train state of a real config.

Saves (synchronously, to time the whole write) and restores the same train state in both places,
interleaved, `--rounds` times, in one process. Prints one JSON object as its last line: the state's
size, the median save and restore seconds of each, and the bucket/disk ratios.

The emulator (`tests/gcs_emulator.py`: gcp-storage-emulator, pure Python, objects in memory)
serves every request from one Python process, so its times say what jaxlm and TensorStore add on
top of an HTTP object store, and an upper bound for the request count's cost: not Cloud Storage's
own speed, which depends on the VM's network and the bucket's region.

    PYTHONPATH=. python experiments/bench/gcs_checkpoint.py [--config ladder-1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.gcs_emulator

import jax

from jaxlm import checkpoint
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer
from jaxlm.run import abstract_train_state, init_train_state
from jaxlm.sharding import make_mesh
from tests.gcs_emulator import Emulator


def _save_restore(workdir: str, step: int, state, abstract, config, files) -> tuple[float, float]:
    ckpt_config = config.checkpoint.__class__(every=1, keep=1, async_save=False)
    ckpt = checkpoint.Checkpointer(workdir, ckpt_config)
    t0 = time.perf_counter()
    ckpt.save(step, state, {}, config, files)
    ckpt.wait()
    saved = time.perf_counter() - t0
    ckpt.close()
    reader = checkpoint.Checkpointer(workdir, read_only=True)
    t0 = time.perf_counter()
    restored, _ = reader.restore(step, abstract)
    jax.block_until_ready(restored)
    loaded = time.perf_counter() - t0
    reader.close()
    return saved, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ladder-1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = load_config(args.config, ["data.tokenizer=byte"])
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    state = init_train_state(config, mesh, 0)
    abstract = abstract_train_state(config, mesh)
    files = checkpoint.tokenizer_files(ByteTokenizer())
    nbytes = checkpoint.state_bytes(state)

    emulator = Emulator()
    os.environ.update(emulator.env())
    times: dict[str, dict[str, list[float]]] = {
        where: {"save": [], "restore": []} for where in ("disk", "bucket")
    }
    try:
        bucket = emulator.new_bucket()
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds + 1):  # round 0 warms up (compiles, connections)
                for where in ("disk", "bucket") if r % 2 == 0 else ("bucket", "disk"):
                    root = f"gs://{bucket}/run{r}" if where == "bucket" else f"{tmp}/run{r}"
                    saved, loaded = _save_restore(root, r + 1, state, abstract, config, files)
                    if r:
                        times[where]["save"].append(saved)
                        times[where]["restore"].append(loaded)
                    print(f"round {r} {where}: save {saved:.2f} s, restore {loaded:.2f} s")
    finally:
        emulator.stop()
    med = {w: {k: statistics.median(v) for k, v in t.items()} for w, t in times.items()}
    print(
        json.dumps(
            {
                "config": args.config,
                "state_mib": round(nbytes / 2**20, 1),
                "rounds": args.rounds,
                "disk_save_s": round(med["disk"]["save"], 3),
                "disk_restore_s": round(med["disk"]["restore"], 3),
                "bucket_save_s": round(med["bucket"]["save"], 3),
                "bucket_restore_s": round(med["bucket"]["restore"], 3),
                "save_ratio_bucket_vs_disk": round(med["bucket"]["save"] / med["disk"]["save"], 2),
                "restore_ratio_bucket_vs_disk": round(
                    med["bucket"]["restore"] / med["disk"]["restore"], 2
                ),
                "bucket_save_mib_per_s": round(nbytes / 2**20 / med["bucket"]["save"], 1),
                "bucket_restore_mib_per_s": round(nbytes / 2**20 / med["bucket"]["restore"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
