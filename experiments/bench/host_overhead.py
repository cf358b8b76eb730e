"""Host overhead of the training loop: `jaxlm.loop.train` against its bare jitted step.

At nanoGPT's CPU recipe shape (4 layers, 4 heads, d 128, MLP 512, block 64, batch 12; byte
tokens, the default corpus), three ways of running the same train step are timed in interleaved
rounds (the order rotates each round):

- `loop`: the real loop (`jaxlm.loop.train`, default logging every 10 steps, metrics fetched
  every step, stop and checkpoint checks, the data pipeline), its seconds per step read from the
  tokens/s it logs (compilation, evaluation and checkpoint writes are left out of those, as the
  loop's own meter does; no checkpoint is written mid-run here);
- `data_step`: `next(iterator)` + `to_global` + the step, in a plain Python loop;
- `bare`: the step alone on one batch already on the device.

`loop_overhead` is the median over rounds of loop / bare - 1 (the issue's target: at most 0.05);
`data_overhead` the same for data_step, which shows how much of it is the input pipeline.

Prints one JSON object as its last line.

    python experiments/bench/host_overhead.py [--rounds 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax

from jaxlm import loop
from jaxlm.configs import CheckpointConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from jaxlm.data import to_global
from jaxlm.run import RunPlan


def _config(steps: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            vocab_size=320,
            d_model=128,
            num_layers=4,
            num_heads=4,
            mlp_dim=512,
            max_seq_len=64,
            activation="gelu_tanh",
        ),
        data=DataConfig(seq_len=64, batch_size=12),
        train=TrainConfig(steps=steps, eval_every=steps, eval_batches=1, sample_tokens=0),
        checkpoint=CheckpointConfig(every=steps, async_save=False),
    )


def _loop_step_s(steps: int) -> float:
    """Seconds per step of a whole `loop.train` run, from the rates it logged."""
    with tempfile.TemporaryDirectory() as tmp:
        out = loop.train(_config(steps), tmp)
    rates = [h["tokens_per_sec"] for h in out["history"] if "tokens_per_sec" in h]
    tokens = 12 * 64
    return statistics.mean(tokens / r for r in rates[1:])  # the first interval warms up


class _Plain:
    """The same step in a plain Python loop: with the data pipeline, or on one batch."""

    def __init__(self, steps: int) -> None:
        self.plan = RunPlan(_config(steps))
        self.it = self.plan.make_iterator()
        self.state = self.plan.init_state()
        self.batch = self._next()
        self.state, out = self.plan.train_step(self.state, self.batch)  # compile
        jax.block_until_ready(out)

    def _next(self):
        return to_global(next(self.it), self.plan.mesh, self.it.rows, self.it.global_batch)

    def time(self, steps: int, data: bool) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = self._next() if data else self.batch
            self.state, out = self.plan.train_step(self.state, batch)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    plain = _Plain(args.steps)
    runs = {
        "loop": lambda: _loop_step_s(args.steps),
        "data_step": lambda: plain.time(args.steps, data=True),
        "bare": lambda: plain.time(args.steps, data=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runs[name]())
    result: dict = {"config": "nanogpt shape, byte tokens, default corpus", "steps": args.steps}
    for name, ts in times.items():
        result[f"{name}_step_s"] = round(statistics.median(ts), 5)
    for name in ("loop", "data_step"):
        ratios = [a / b - 1 for a, b in zip(times[name], times["bare"], strict=True)]
        result[f"{name.removesuffix('_step')}_overhead"] = round(statistics.median(ratios), 3)
    result["rounds"] = {name: [round(t, 5) for t in ts] for name, ts in times.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
