"""`jaxlm plan` for every preset on the pod it is meant for (`aot.INTENDED_PODS`): the
recommended layout, its bytes per chip against the chip's HBM and the roofline estimate, with at
most `--max-compiles` train steps compiled per preset (least model parallelism first) and the
remat policies tried from `--remat`. Prints one JSON object; the figures are cached like the
command's (<jaxlm cache>/plan), so a rerun compiles only what changed.

    python experiments/bench/plan_presets.py
    python experiments/bench/plan_presets.py --presets tiny,gpt2-124m --max-compiles 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from jaxlm import aot
from jaxlm.configs.overrides import load_config
from jaxlm.configs.presets import PRESETS
from jaxlm.data.sources import cache_dir

GIB = 2.0**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(aot.INTENDED_PODS))
    parser.add_argument("--max-compiles", type=int, default=3)
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    out = {}
    for name in args.presets.split(","):
        topology, seq_len, batch = aot.INTENDED_PODS[name]
        overrides = [f"data.seq_len={seq_len}", f"data.batch_size={batch}"]
        if seq_len > PRESETS[name].max_seq_len:
            overrides.append(f"model.max_seq_len={seq_len}")
        start = time.perf_counter()
        result = aot.plan_layouts(
            load_config(name, overrides),
            topology,
            remats=tuple(args.remat.split(",")),
            max_compiles=args.max_compiles,
            cache=cache_dir() / "plan",
        )
        best = result["recommended"]
        out[name] = {
            "topology": topology,
            "seq_len": seq_len,
            "batch": batch,
            "recommended": best and best["layout"],
            "total_gib": best and round(best["total_bytes"] / GIB, 2),
            "hbm_gib": round(result["chip"]["hbm_bytes"] / GIB, 1),
            "step_seconds_estimate": best and round(best["step_seconds"], 4),
            "compiled": sum(r["status"].startswith("compiled") for r in result["layouts"]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
