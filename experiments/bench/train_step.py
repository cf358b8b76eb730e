"""Train-step speed and compile time on this machine: jaxlm vs a minimal hand-written Flax GPT.

Two shapes: "matched" (vocab 1024, d 256, 4 layers, seq 256, batch 16) and "nanogpt" (nanoGPT's
CPU recipe: 4 layers, 4 heads, d 128, MLP 512, block 64, batch 12). At each, four steps are timed
in interleaved rounds (the order rotates each round): jaxlm's default layout (scanned, which on
CPU unrolls the loop for models of up to 8 layers), jaxlm unrolled (`scan_layers=False`), jaxlm
scanned with XLA's while loop (`scan_unroll=1`, as on TPU) and the minimal GPT (same shapes,
AdamW, no clipping, no checks). `vs_minimal_*` is the median over rounds of the minimal step's
time divided by jaxlm's in the same round (>= 1: jaxlm at least as fast); `cpu_mfu` is the
default layout's model FLOP/s over the float32 matmul FLOP/s measured in this process.

`compile_s` times tracing + XLA compilation of the train step (matched shape, one device, nothing
run): the minimal GPT and jaxlm's default at 4 layers (the least of two, alternating, after a
warm-up compile that takes the process's one-time costs), and the while loop at 4 / 16 / 48
layers.

Prints one JSON object as its last line.

    python experiments/bench/train_step.py [--rounds 6] [--skip-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.configs import (
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from jaxlm.metrics import flops_per_token, measure_matmul_flops
from jaxlm.run import RunPlan
from jaxlm.sharding import make_mesh, use_mesh

SHAPES = {
    "matched": dict(vocab=1024, d=256, layers=4, heads=4, mlp=1024, seq=256, batch=16, steps=2),
    "nanogpt": dict(vocab=1024, d=128, layers=4, heads=4, mlp=512, seq=64, batch=12, steps=10),
}


class _Block(nn.Module):
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h = nn.LayerNorm()(x)
        qkv = nn.Dense(3 * d)(h).reshape(b, t, 3 * self.heads, d // self.heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // self.heads)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], s, -1e9)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
        x = x + nn.Dense(d)(a)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(d)(jax.nn.gelu(nn.Dense(self.mlp)(h)))


class _MinimalGPT(nn.Module):
    """GPT-2 style: token + learned position embeddings, pre-norm blocks, tied output."""

    vocab: int
    d: int
    layers: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d)
        pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], self.d))
        x = embed(tokens) + pos[None]
        for _ in range(self.layers):
            x = _Block(self.heads, self.mlp)(x)
        return embed.attend(nn.LayerNorm()(x))


def _minimal_step(s: dict):
    gpt = _MinimalGPT(s["vocab"], s["d"], s["layers"], s["heads"], s["mlp"])
    tx = optax.adamw(3e-4, weight_decay=0.1)

    def step(carry, batch):
        params, opt_state = carry

        def loss(p):
            logits = gpt.apply(p, batch["tokens"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    def init():
        params = gpt.init(jax.random.key(0), jnp.zeros((s["batch"], s["seq"]), jnp.int32))
        return params, tx.init(params)

    return jax.jit(step, donate_argnums=0), init


def _config(s: dict, **model: object) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            vocab_size=s["vocab"],
            d_model=s["d"],
            num_layers=s["layers"],
            num_heads=s["heads"],
            mlp_dim=s["mlp"],
            max_seq_len=s["seq"],
            activation="gelu_tanh",
            **model,
        ),
        data=DataConfig(seq_len=s["seq"], batch_size=s["batch"]),
        optim=OptimConfig(warmup_steps=0, schedule="constant"),
        train=TrainConfig(steps=1000),
    )


def _batch(s: dict) -> dict[str, np.ndarray]:
    b, t = s["batch"], s["seq"]
    tokens = np.random.default_rng(0).integers(0, s["vocab"], (b, t + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": np.ones((b, t), bool),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "target_bytes": np.full((b,), t, np.int32),
    }


class _Timer:
    """Seconds per step of `fn`, one entry per round (rounds interleave between timers)."""

    def __init__(self, fn, state, batch) -> None:
        self.fn, self.state, self.batch, self.times = fn, state, batch, []
        self.state, out = fn(state, batch)  # compile
        jax.block_until_ready(out)

    def round(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, out = self.fn(self.state, self.batch)
        jax.block_until_ready(out)
        self.times.append((time.perf_counter() - start) / steps)


def _speed(s: dict, rounds: int) -> dict:
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    batch = jax.device_put(_batch(s))
    timers = {}
    for layout, model in (
        ("default", {}),
        ("unrolled", {"scan_layers": False}),
        ("while_loop", {"scan_unroll": 1}),
    ):
        plan = RunPlan(_config(s, **model), mesh=mesh)
        timers[layout] = _Timer(plan.train_step, plan.init_state(0), batch)
    step, init = _minimal_step(s)
    timers["minimal"] = _Timer(step, init(), {k: batch[k] for k in ("tokens", "targets")})
    order = list(timers.values())
    for r in range(rounds):
        for timer in order[r % len(order) :] + order[: r % len(order)]:
            timer.round(s["steps"])
    minimal = timers["minimal"].times
    out: dict = {"config": {k: v for k, v in s.items() if k != "steps"}}
    for layout, timer in timers.items():
        out[f"{layout}_step_s"] = round(min(timer.times), 4)
        if layout != "minimal":
            ratios = [m / t for m, t in zip(minimal, timer.times, strict=True)]
            out[f"vs_minimal_{layout}"] = round(statistics.median(ratios), 3)
    tokens = s["batch"] * s["seq"]
    out["tokens_per_s"] = round(tokens / min(timers["default"].times))
    out["achieved_flops"] = flops_per_token(_config(s).model, s["seq"]) * out["tokens_per_s"]
    return out


def _compile_seconds(fn, *args) -> float:
    jax.clear_caches()  # or a second compile of the same program comes from jax's in-memory cache
    start = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - start


def _compile_times(s: dict, repeats: int = 2) -> dict:
    """Trace + lower + compile seconds, the least of `repeats` (minimal and default alternate).

    A tiny program is compiled first, so that the process's one-time costs (LLVM and XLA's
    start-up) fall on neither of the programs compared."""
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    jax.jit(lambda x: jnp.tanh(x) @ x).lower(jnp.ones((8, 8))).compile()
    step, init = _minimal_step(s)
    batch = {
        k: jax.ShapeDtypeStruct((s["batch"], s["seq"]), jnp.int32) for k in ("tokens", "targets")
    }
    # name -> seconds of one trace + lower + compile of that program
    programs = {"minimal_4": lambda: _compile_seconds(step, jax.eval_shape(init), batch)}
    for name, layers, model in (
        ("default_4", 4, {}),
        ("while_loop_4", 4, {"scan_unroll": 1}),
        ("while_loop_16", 16, {"scan_unroll": 1}),
        ("while_loop_48", 48, {"scan_unroll": 1}),
    ):
        plan = RunPlan(_config({**s, "layers": layers}, **model), mesh=mesh)

        def jaxlm_seconds(plan=plan) -> float:
            with use_mesh(plan.mesh, plan.rules):
                return _compile_seconds(
                    plan.train_step.jitted, plan.abstract_state, plan.abstract_batch()
                )

        programs[name] = jaxlm_seconds
    times: dict[str, list[float]] = {name: [] for name in programs}
    for r in range(repeats):
        # The two the target compares, alternating first; the depths once each.
        names = ["minimal_4", "default_4"][:: 1 if r % 2 == 0 else -1]
        names += [n for n in programs if n.startswith("while") and r == 0]
        for name in names:
            times[name].append(programs[name]())
    out = {name: round(min(t), 2) for name, t in times.items()}
    out["default_4_vs_minimal"] = round(out["default_4"] / out["minimal_4"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shapes", default="matched,nanogpt", help="comma-separated")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    matmul = measure_matmul_flops()
    result: dict = {"dtype": "float32", "devices": 1}
    for name in args.shapes.split(","):
        result[name] = _speed(SHAPES[name], args.rounds)
    result["matmul_flops"] = matmul = max(matmul, measure_matmul_flops())
    for name in args.shapes.split(","):
        result[name]["cpu_mfu"] = round(result[name]["achieved_flops"] / matmul, 3)
    if not args.skip_compile:
        result["compile_s"] = _compile_times(SHAPES["matched"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
