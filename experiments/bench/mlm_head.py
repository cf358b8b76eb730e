"""Masked-LM step time: the vocabulary head over every position vs over the chosen ones only.

`task.max_predictions=K` caps the chosen tokens of a row at K (BERT's max_predictions_per_seq)
and runs the MLM head (dense + norm + the [d_model, vocab] unembedding) on those K positions
instead of all T. The model is a small BERT with BERT's vocabulary (30,522 ids, so the head is a
large part of the step); both settings train on the same masked batches (made with the cap, so
the full head scores the same positions), interleaved over `--rounds` rounds. Prints one JSON
object as its last line: step times and `speedup` (full / gathered).

    python experiments/bench/mlm_head.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from jaxlm.configs.overrides import load_config
from jaxlm.data import to_global
from jaxlm.run import RunPlan


def _config(seq_len: int, batch: int, cap: int | None) -> object:
    overrides = [
        "task.kind=mlm",
        "model.vocab_size=30522",
        "model.d_model=256",
        "model.num_layers=4",
        "model.num_heads=4",
        "model.mlp_dim=1024",
        f"model.max_seq_len={seq_len}",
        f"data.seq_len={seq_len}",
        f"data.batch_size={batch}",
        "optim.warmup_steps=0",
    ]
    return load_config("tiny-bert", overrides + ([f"task.max_predictions={cap}"] if cap else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-predictions", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    gathered = RunPlan(_config(args.seq_len, args.batch, args.max_predictions))
    masking = gathered.task.masking(gathered.tokenizer)
    rng = np.random.default_rng(0)
    raw = []
    for _ in range(args.steps + 1):
        rows = [
            masking.corrupt(rng.integers(3, 259, args.seq_len), np.ones(args.seq_len, int), rng)
            for _ in range(args.batch)
        ]
        raw.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    runs = {"full": RunPlan(_config(args.seq_len, args.batch, None)), "gathered": gathered}
    state_of, batches_of, times = {}, {}, {name: [] for name in runs}
    for name, plan in runs.items():
        keys = plan.task.batch_spec()
        batches_of[name] = [to_global({k: b[k] for k in keys}, plan.mesh) for b in raw]
        state = plan.init_state(0)
        state, _ = plan.train_step(state, batches_of[name][0])  # compile outside the timing
        state_of[name] = jax.block_until_ready(state)
    for _ in range(args.rounds):
        for name, plan in runs.items():
            state = state_of[name]
            start = time.perf_counter()
            for batch in batches_of[name][1:]:
                state, _ = plan.train_step(state, batch)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / args.steps)
            state_of[name] = state
    full, fast = statistics.median(times["full"]), statistics.median(times["gathered"])
    report = {
        "seq_len": args.seq_len,
        "batch": args.batch,
        "max_predictions": args.max_predictions,
        "vocab_size": 30522,
        "full_head_step_s": round(full, 4),
        "gathered_head_step_s": round(fast, 4),
        "speedup": round(full / fast, 3),
        "rounds": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
