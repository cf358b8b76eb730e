"""Scaling curves from cooldowns against one run per point: run the grids of
experiments/sweeps/cpu_cooldown.py (resumably, in WORKDIR/cooldown, WORKDIR/full (WSD) and
WORKDIR/full_cosine), fit Chinchilla approach 3 to each with bootstrap intervals, and print the
fits and the compute each grid trained as JSON.

    PYTHONPATH=. python experiments/bench/cooldown_fit.py [--workdir runs/bench_cooldown]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxlm.configs.overrides import load_python_file
from jaxlm.scaling import fit_runs, run_size, run_sweep

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "cpu_cooldown.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_cooldown")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    grids = load_python_file(SWEEP)
    out = {}
    grid = {
        "cooldown": grids.get_sweep(),
        "full": grids.get_full_grid(),  # the same WSD schedules, one run per point
        "full_cosine": grids.get_full_grid("cosine"),  # the usual one-run-per-point practice
    }
    for name, runs in grid.items():
        start = time.time()
        rows = run_sweep(runs, Path(args.workdir) / name, log=lambda _: None)
        fit = fit_runs(rows, bootstrap=args.bootstrap).chinchilla
        out[name] = {
            "runs": len(runs),
            "points": len(rows),
            # What the grid itself trained (a branch: only its cooldown; the trunks in full).
            "flops_trained": sum(r["flops_trained"] for r in rows)
            + sum(6 * r["params"] * r["tokens"] for r in _trunks(runs)),
            "wall_s": round(time.time() - start, 1),
            "alpha": fit.alpha,
            "beta": fit.beta,
            "E": fit.E,
            "ci": {k: list(v) for k, v in fit.ci.items()},
            "losses": {r["name"]: r["eval_loss"] for r in rows},
        }
    c = out["cooldown"]
    for name in ("full", "full_cosine"):
        f = out[name]
        out[f"compute_ratio_vs_{name}"] = c["flops_trained"] / f["flops_trained"]
        out[f"exponents_within_each_others_intervals_vs_{name}"] = {
            k: f["ci"][k][0] <= c[k] <= f["ci"][k][1] and c["ci"][k][0] <= f[k] <= c["ci"][k][1]
            for k in ("alpha", "beta")
        }
    print(json.dumps(out))


def _trunks(runs):
    return [run_size(r.config) for r in runs if not r.results]


if __name__ == "__main__":
    main()
