"""Per-chip memory of a long-sequence train step split over `mesh.context`, compiled ahead of
time for a TPU topology from this CPU host (libtpu from the `tpu` extra; no chips).

Eight chips, one row of `--seq-len` tokens per data-parallel group: context C = 1, 2, 4, 8 with
fsdp 8 / C and a global batch of 8 / C rows, so each chip holds T / C positions of one row. The
weights and the optimizer state are sharded over fsdp x context, the same share per chip for
every C. Per C, attention strategy and causal load balancing, the rows report
`memory_analysis()` (arguments, temporaries) and `cost_analysis()` FLOPs of the compiled step
per chip, and the temporaries against C = 1's. Prints one JSON object.

    python experiments/bench/context_aot.py
    python experiments/bench/context_aot.py --preset ladder-0 --topology v5e:2x4 --seq-len 16384
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from experiments.bench.attention_aot import step_figures
from jaxlm import sharding
from jaxlm.configs.overrides import load_config
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.platforms import tpu_topology
from jaxlm.run import RunPlan

GIB = 2.0**30


def compile_step(
    preset: str, topology: str, seq_len: int, shards: int, strategy: str, balance: bool = True
) -> dict:
    devices = tpu_topology(topology).devices
    chips = len(devices)
    config = load_config(
        preset,
        [
            "model.remat=full",
            "model.dtype=bfloat16",
            "model.attention_impl=xla",
            f"model.max_seq_len={seq_len}",
            f"model.context_attention={strategy}",
            f"model.context_load_balance={balance}",
            f"data.seq_len={seq_len}",
            f"data.batch_size={chips // shards}",
            f"mesh.fsdp={chips // shards}",
            f"mesh.context={shards}",
        ],
    )
    mesh = sharding.make_mesh(config.mesh, devices)
    plan = RunPlan(config, mesh=mesh, tokenizer=ByteTokenizer(), check_data=False)
    figures, _ = step_figures(plan)
    return {
        "context": shards,
        "strategy": strategy,
        "load_balance": balance,
        "argument_gib": round(figures["argument_bytes"] / GIB, 3),
        "temp_gib": round(figures["temp_bytes"] / GIB, 3),
        "flops": figures["flops"],
        "compile_s": figures["compile_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ladder-0")
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--contexts", default="1,2,4,8")
    parser.add_argument("--strategies", default="ring,all_gather")
    parser.add_argument(
        "--unbalanced", type=int, default=1, help="1: also the first strategy without balancing"
    )
    args = parser.parse_args(argv)
    rows = []
    strategies = args.strategies.split(",")
    cases = [(s, True) for s in strategies] + [(strategies[0], False)] * args.unbalanced
    for strategy, balance in cases:
        for shards in map(int, args.contexts.split(",")):
            if shards == 1 and (strategy, balance) != cases[0]:
                continue  # unsplit: no strategy
            row = compile_step(args.preset, args.topology, args.seq_len, shards, strategy, balance)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    base = next(r for r in rows if r["context"] == 1)
    for r in rows:
        r["temp_vs_unsplit"] = round(r["temp_gib"] / base["temp_gib"], 3)
    return {
        "preset": args.preset,
        "topology": args.topology,
        "seq_len": args.seq_len,
        "rows": rows,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
