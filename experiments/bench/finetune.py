"""Fine-tuning cost: train-state bytes and step time of full fine-tuning vs LoRA vs prompt tuning.

One process, the same model and batches, the three methods interleaved over `--rounds` rounds
(the machine is noisy: ratios are measured within one run). The train-state bytes are exact
(every array of the state); `--size-config` adds the train-state bytes of a larger preset from
its abstract state only (nothing allocated). Prints one JSON object as its last line.

    python experiments/bench/finetune.py [--config ladder-0] [--size-config ladder-6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from jaxlm import checkpoint
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.run import RunPlan
from jaxlm.tasks import partition

METHODS = {
    "full": [],
    "lora_r8": ["model.lora.rank=8", "model.lora.targets=query,key,value,out,gate,up,down"],
    "prompt_16": ["model.prompt_tokens=16"],
}


def _config(name: str, method: str, seq_len: int, batch: int) -> object:
    return load_config(
        name,
        [
            f"data.seq_len={seq_len}",
            f"data.batch_size={batch}",
            "optim.warmup_steps=0",
            *METHODS[method],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="ladder-0")
    parser.add_argument("--size-config", default="ladder-6")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5) for i in range(256)]
    it = DataIterator(
        build_dataset(docs, ByteTokenizer(), seq_len=args.seq_len, batch_size=args.batch)
    )
    raw = [next(it) for _ in range(args.steps + 1)]
    runs = {}
    for method in METHODS:
        plan = RunPlan(_config(args.config, method, args.seq_len, args.batch))
        batches = [to_global(b, plan.mesh) for b in raw]
        state = plan.init_state()
        state, _ = plan.train_step(state, batches[0])  # compile outside the timing
        jax.block_until_ready(state)
        runs[method] = {"plan": plan, "state": state, "batches": batches, "times": []}
    for _ in range(args.rounds):
        for run in runs.values():
            state = run["state"]
            start = time.perf_counter()
            for batch in run["batches"][1:]:
                state, _ = run["plan"].train_step(state, batch)
            jax.block_until_ready(state)
            run["times"].append((time.perf_counter() - start) / args.steps)
            run["state"] = state

    report = {"config": args.config, "seq_len": args.seq_len, "batch": args.batch}
    full_s = statistics.median(runs["full"]["times"])
    full_bytes = checkpoint.state_bytes(runs["full"]["state"])
    for method, run in runs.items():
        trainable = run["plan"].task.trainable
        step_s = statistics.median(run["times"])
        state_bytes = checkpoint.state_bytes(run["state"])
        report[method] = {
            "trained_params": sum(
                x.size for x in jax.tree.leaves(partition(run["state"].params, trainable)[0])
            ),
            "train_state_bytes": state_bytes,
            "optimizer_state_bytes": checkpoint.state_bytes(run["state"].opt_state),
            "step_s": round(step_s, 4),
            "step_s_all_rounds": [round(t, 4) for t in run["times"]],
            "state_bytes_vs_full": round(state_bytes / full_bytes, 4),
            "speed_vs_full": round(full_s / step_s, 3),
        }
    if args.size_config:
        sizes = {}
        for method in ("full", "lora_r8"):
            plan = RunPlan(_config(args.size_config, method, args.seq_len, args.batch))
            sizes[method] = checkpoint.state_bytes(plan.abstract_state)
        report["abstract_train_state_bytes"] = {
            "config": args.size_config,
            **sizes,
            "lora_vs_full": round(sizes["lora_r8"] / sizes["full"], 4),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
