"""Dense vs MoE at matched active parameters, and dropless vs capacity dispatch.

A Llama-style model (d_model 256, 4 layers, seq 128, batch 8, float32) three ways, interleaved
and repeated in one process on one device: dense (MLP 1024), MoE with 8 experts of 512, top-2
(the same active MLP parameters per token) with dropless `ragged_dot` dispatch, and the same MoE
with capacity dispatch (factor 1.25). Prints one JSON object as its last line: step seconds,
tokens/s, total and active parameters, and the ratios.

    python experiments/bench/moe.py [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax

from jaxlm.configs import DataConfig, ModelConfig, MoEConfig, OptimConfig, RunConfig, TrainConfig
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, to_global
from jaxlm.metrics import param_count
from jaxlm.run import init_train_state, make_train_step
from jaxlm.sharding import make_mesh

DENSE = ModelConfig(
    vocab_size=320,
    d_model=256,
    num_layers=4,
    num_heads=4,
    mlp_dim=1024,
    max_seq_len=128,
    activation="swiglu",
    norm="rmsnorm",
    position="rope",
    attn_bias=False,
    mlp_bias=False,
    scan_layers=False,
)
MOE = dataclasses.replace(DENSE, moe=MoEConfig(num_experts=8, top_k=2, expert_mlp_dim=512))


def _setup(model: ModelConfig):
    config = RunConfig(
        model=model,
        data=DataConfig(seq_len=128, batch_size=8),
        optim=OptimConfig(warmup_steps=0, schedule="constant"),
        train=TrainConfig(steps=1000),
    )
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    state = init_train_state(config, mesh, 0)
    step = make_train_step(config, mesh)
    docs = [f"for i in range({i}):\n    print(i * {i})\n" * 20 for i in range(200)]
    ds = build_dataset(docs, ByteTokenizer(), seq_len=128, batch_size=8)
    it = DataIterator(ds)
    batch = to_global(next(it), mesh)
    state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    return [state, step, batch]


def _time(setup, steps: int) -> float:
    state, step, batch = setup
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    setup[0] = state
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    models = {
        "dense": DENSE,
        "moe_dropless": MOE,
        "moe_capacity": dataclasses.replace(
            MOE, moe=dataclasses.replace(MOE.moe, dispatch="capacity", capacity_factor=1.25)
        ),
    }
    setups = {name: _setup(m) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            times[name].append(_time(setups[name], args.steps))
    step_s = {name: statistics.median(t) for name, t in times.items()}
    tokens = 8 * 128
    result: dict = {"device": jax.devices()[0].device_kind}
    for name, model in models.items():
        counts = param_count(model)
        result[f"{name}_step_s"] = round(step_s[name], 4)
        result[f"{name}_tokens_per_s"] = round(tokens / step_s[name], 1)
        result[f"{name}_params"] = counts.total
        result[f"{name}_active_params"] = counts.active
    result["moe_dropless_vs_dense_time"] = round(step_s["moe_dropless"] / step_s["dense"], 3)
    result["moe_capacity_vs_dense_time"] = round(step_s["moe_capacity"] / step_s["dense"], 3)
    result["capacity_vs_dropless_time"] = round(step_s["moe_capacity"] / step_s["moe_dropless"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
