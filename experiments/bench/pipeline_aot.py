"""Pipeline parallelism ahead of time: per-chip memory, FLOPs and the computed bubble of a train
step with its layers split into stages over DCN, compiled for a multi-slice TPU topology from
this CPU host (libtpu from the `tpu` extra; no chips).

Default: llama3-8b (bfloat16, full remat, 4096-token rows, 64 rows a step) on 2 slices of
v5p:2x2x2 (16 chips). Layouts: the two slices as data parallel (`dcn_data=2`, each slice a full
fsdp copy of the state) or as fsdp (`dcn_fsdp=2`, the state split over both), against 2 pipeline
stages over DCN (`dcn_stage=2`, each slice holds half the layers) with GPipe at 2 and 8
microbatches (at 8 also with each stage's weights gathered once per step,
`pipeline_gather_weights`) and a circular schedule (2 trips). Per layout: `memory_analysis()`
(arguments, temporaries), the FLOPs per chip (`aot.step_flops`: the model's, with remat's
recompute and the bubble), the bytes each chip sends over ICI and over DCN per step
(`hlo.collective_bytes`, from the compiled program), and `pipeline.bubble_fraction` (the
stage-steps idle). Prints one JSON object.

    python experiments/bench/pipeline_aot.py
    python experiments/bench/pipeline_aot.py --preset ladder-0 --topology v5e:2x2 --seq-len 512
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
from jaxlm import aot, hlo, sharding
from jaxlm.configs.overrides import load_config
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.model import pipeline
from jaxlm.platforms import tpu_topology
from jaxlm.run import RunPlan

GIB = 2.0**30

# (name, mesh and schedule overrides); the ICI axis is fsdp within a slice throughout.
LAYOUTS = [
    ("dcn_data", ["mesh.dcn_data=2"]),
    ("dcn_fsdp", ["mesh.dcn_fsdp=2"]),
    ("stages_gpipe_m2", ["mesh.dcn_stage=2", "model.pipeline_microbatches=2"]),
    ("stages_gpipe_m8", ["mesh.dcn_stage=2", "model.pipeline_microbatches=8"]),
    (
        "stages_gpipe_m8_gathered",
        ["mesh.dcn_stage=2", "model.pipeline_microbatches=8", "model.pipeline_gather_weights=True"],
    ),
    (
        "stages_circular_m8_r2",
        ["mesh.dcn_stage=2", "model.pipeline_microbatches=8", "model.pipeline_repeats=2"],
    ),
]


def compile_layout(
    preset: str, topology: str, slices: int, seq_len: int, batch: int, overrides: list[str]
) -> dict:
    devices = tpu_topology(topology, slices).devices
    config = load_config(
        preset,
        [
            "model.remat=full",
            "model.dtype=bfloat16",
            "model.attention_impl=xla",
            f"model.max_seq_len={max(seq_len, 128)}",
            f"data.seq_len={seq_len}",
            f"data.batch_size={batch}",
            "mesh.fsdp=-1",
            *overrides,
        ],
    )
    mesh = sharding.make_mesh(config.mesh, devices)
    plan = RunPlan(config, mesh=mesh, tokenizer=ByteTokenizer(), check_data=False)
    figures, program = step_figures(plan)
    stages = int(mesh.shape["stage"])
    m = pipeline.microbatches(config.model, stages)
    bubble = pipeline.bubble_fraction(stages, m, config.model.pipeline_repeats)
    moved = hlo.collective_bytes(program)
    return {
        "mesh": {k: int(v) for k, v in mesh.shape.items() if v > 1},
        "microbatches": m if stages > 1 else None,
        "repeats": config.model.pipeline_repeats if stages > 1 else None,
        "bubble_fraction": round(bubble, 3),
        "argument_gib": round(figures["argument_bytes"] / GIB, 2),
        "temp_gib": round(figures["temp_bytes"] / GIB, 2),
        "tflops_per_chip": round(aot.step_flops(config, len(devices), bubble) / 1e12, 1),
        "ici_gb_per_chip": round(moved["ici"] / 1e9, 2),
        "dcn_gb_per_chip": round(moved["dcn"] / 1e9, 2),
        "compile_s": figures["compile_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--topology", default="v5p:2x2x2", help="one slice's topology")
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layouts", default=",".join(n for n, _ in LAYOUTS))
    args = parser.parse_args()
    chosen = args.layouts.split(",")
    rows = {}
    for name, overrides in LAYOUTS:
        if name in chosen:
            try:
                rows[name] = compile_layout(
                    args.preset, args.topology, args.slices, args.seq_len, args.batch, overrides
                )
            except Exception as e:  # e.g. the compiler's out-of-memory refusal: a result too
                rows[name] = {"compile_failed": str(e).splitlines()[0][:300]}
            print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "preset": args.preset,
                "topology": f"{args.slices} x {args.topology}",
                "seq_len": args.seq_len,
                "batch": args.batch,
                "layouts": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
