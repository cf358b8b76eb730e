"""How much a checkpoint save stalls the training loop: async vs synchronous Orbax saves.

Trains a small model for a few steps, saving every `--every` steps, three ways in one process
(interleaved, repeated): no saves, async saves, synchronous saves. Prints one JSON object as its
last line: the train-state size, the mean time `save()` blocks the loop, the full write time, and
the step-loop slowdown of each mode relative to no saves.

    python experiments/bench/checkpoint.py [--config ladder-1] [--steps 12] [--every 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import jax

from jaxlm import checkpoint
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.run import init_train_state, make_train_step
from jaxlm.sharding import make_mesh


def _run(config, mesh, batches, mode: str, every: int) -> dict[str, float]:
    state = init_train_state(config, mesh, 0)
    step = make_train_step(config, mesh)
    state, _ = step(state, batches[0])  # compile outside the timing
    jax.block_until_ready(state)
    files = checkpoint.tokenizer_files(ByteTokenizer())
    blocked, wait = [], 0.0
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = None
        if mode != "none":
            ckpt_config = config.checkpoint.__class__(
                every=every, keep=2, async_save=mode == "async"
            )
            ckpt = checkpoint.Checkpointer(workdir, ckpt_config)
        start = time.perf_counter()
        for i, batch in enumerate(batches[1:], start=1):
            state, _ = step(state, batch)
            if ckpt and i % every == 0:
                jax.block_until_ready(state)  # time the save alone, not the queued steps
                t0 = time.perf_counter()
                ckpt.save(i, state, {}, config, files)
                t1 = time.perf_counter()
                blocked.append(t1 - t0)
        jax.block_until_ready(state)
        loop_s = time.perf_counter() - start
        if ckpt:
            t0 = time.perf_counter()
            ckpt.wait()
            wait = time.perf_counter() - t0
            ckpt.close()
    return {"loop_s": loop_s, "blocked_s": sum(blocked) / max(len(blocked), 1), "wait_s": wait}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ladder-1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    config = load_config(
        args.config, ["data.seq_len=128", "data.batch_size=8", "model.max_seq_len=128"]
    )
    mesh = make_mesh(config.mesh)
    tok = ByteTokenizer()
    docs = [f"print({i} * {i})\n" * 40 for i in range(256)]
    ds = build_dataset(docs, tok, seq_len=config.data.seq_len, batch_size=config.data.batch_size)
    it = DataIterator(ds)
    batches = [to_global(next(it), mesh) for _ in range(args.steps + 1)]
    state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(init_train_state(config, mesh, 0))
    )
    runs: dict[str, list[dict[str, float]]] = {"none": [], "async": [], "sync": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(_run(config, mesh, batches, mode, args.every))
    loop = {m: statistics.median(r["loop_s"] for r in rs) for m, rs in runs.items()}
    blocked = {m: statistics.median(r["blocked_s"] for r in rs) for m, rs in runs.items()}
    result = {
        "config": args.config,
        "state_mib": round(state_bytes / 2**20, 2),
        "steps": args.steps,
        "saves": args.steps // args.every,
        "step_s": round(loop["none"] / args.steps, 4),
        "async_save_blocks_s": round(blocked["async"], 4),
        "sync_save_blocks_s": round(blocked["sync"], 4),
        "async_final_wait_s": round(statistics.median(r["wait_s"] for r in runs["async"]), 4),
        "async_loop_slowdown": round(loop["async"] / loop["none"], 3),
        "sync_loop_slowdown": round(loop["sync"] / loop["none"], 3),
        "async_blocking_vs_sync": round(blocked["async"] / blocked["sync"], 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
