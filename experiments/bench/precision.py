"""Precision policies on the 2-core CPU: the training and held-out loss of each against float32,
and why float16 needs loss scaling. Prints JSON.

1. `curves`: tiny-llama, 300 steps on the default corpus (batch 8 x 128 tokens), once per
   policy: float32; bfloat16 compute with float32 weights; pure bfloat16; float16 compute with
   dynamic loss scaling; float16 without it. Per policy: the held-out loss at the end, the mean
   training loss of the last 50 steps, the largest gap to float32's over 25-step windows, the
   skipped steps and overflows, and the wall time (CPUs emulate bfloat16/float16 arithmetic,
   so these times say nothing about an accelerator).
2. `gradients`: the relative L2 error against float32's gradient, and the fraction of entries
   flushed to zero, of float16 compute's gradient at loss scale 1 and 2^15, on one batch of
   64 x 128 tokens (the loss is a mean over tokens, so per-token gradients shrink with the batch:
   the regime loss scaling is for).

    PYTHONPATH=. python experiments/bench/precision.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import loop, metrics, precision
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset
from jaxlm.run import RunPlan

POLICIES = {
    "float32": ("float32", "float32", "auto"),
    "bfloat16_compute": ("bfloat16", "float32", "auto"),
    "pure_bfloat16": ("bfloat16", "bfloat16", "auto"),
    "float16_loss_scaled": ("float16", "float32", "auto"),
    "float16_unscaled": ("float16", "float32", "none"),
}
BASE = [
    "data.seq_len=128",
    "data.batch_size=8",
    "train.steps=300",
    "train.eval_every=300",
    "train.eval_batches=8",
    "train.log_every=1",
    "train.sample_tokens=0",
    "checkpoint.every=300",
]
WINDOW = 25


def curves() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    reference = None
    for name, (dtype, param_dtype, scale) in POLICIES.items():
        config = load_config(
            "tiny-llama",
            [
                *BASE,
                f"model.dtype={dtype}",
                f"model.param_dtype={param_dtype}",
                f"train.loss_scale={scale}",
            ],
        )
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            result = loop.train(config, workdir)
            wall = time.perf_counter() - start
            records = (Path(workdir) / metrics.METRICS_FILE).read_text().splitlines()
            heldout = [r["eval_loss"] for r in map(json.loads, records) if "eval_loss" in r]
        steps = [h for h in result["history"] if "loss" in h]
        loss = np.array([h["loss"] for h in steps])
        windows = loss[: len(loss) // WINDOW * WINDOW].reshape(-1, WINDOW).mean(axis=1)
        reference = windows if reference is None else reference
        last = steps[-1]
        out[name] = {
            "heldout_loss": heldout[-1],
            "train_loss_last50": float(loss[-50:].mean()),
            "max_window_gap_vs_float32": float(np.abs(windows - reference).max()),
            "skipped": float(last["nonfinite_total"] + last.get("overflows", 0.0)),
            "overflows": last.get("overflows", 0.0),
            "final_loss_scale": last.get("loss_scale"),
            "wall_s": round(wall, 1),
        }
        print(name, json.dumps(out[name]), file=sys.stderr)
    return out


def _gradient(dtype: str, scale: float, docs: list[str]) -> np.ndarray:
    """float16/float32 compute's gradient of the mean token loss at `scale`, flattened."""
    config = load_config(
        "tiny-llama", ["data.seq_len=128", "data.batch_size=64", f"model.dtype={dtype}"]
    )
    plan = RunPlan(config)
    params = plan.init_state().params
    dataset = build_dataset(docs, ByteTokenizer(), seq_len=128, batch_size=64, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(DataIterator(dataset)).items()}
    total = plan.task.normalizer(batch)

    def objective(p: dict) -> jax.Array:
        return plan.task.loss_terms(p, batch, jax.random.key(0))["loss"] / total * scale

    grads = precision.unscale(jax.grad(objective)(params), jnp.float32(scale))
    return np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)])


def gradients() -> dict[str, dict[str, float]]:
    docs = [f"def g{i}(y):\n    return y - {i} * {i % 7}\n" * (1 + i % 5) for i in range(512)]
    reference = _gradient("float32", 1.0, docs)
    results: dict[str, dict[str, float]] = {}
    for scale in (1.0, 2.0**15):
        flat = _gradient("float16", scale, docs)
        results[f"float16_scale_{scale:g}"] = {
            "relative_error_vs_float32": float(
                np.linalg.norm(flat - reference) / np.linalg.norm(reference)
            ),
            "flushed_to_zero": float(np.mean((flat == 0) & (reference != 0))),
        }
    return results


if __name__ == "__main__":
    print(json.dumps({"gradients": gradients(), "curves": curves()}))
