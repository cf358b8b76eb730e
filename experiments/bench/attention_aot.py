"""Per-chip memory and FLOPs of whole train steps with `attention_impl` xla vs splash, compiled
ahead of time for TPU topologies from this CPU host (libtpu from the `tpu` extra; no chips).

The XLA path materialises [B, N, T, T] float32 scores per layer (and keeps what the backward
pass needs); splash walks tiles with an online softmax. The rows report `memory_analysis()`
(arguments, temporaries) and `cost_analysis()` FLOPs of the compiled step per chip, the xla /
splash ratio of temporaries, and the same for the attention core alone (one layer's forward +
backward at a chip's share of batch and heads). XLA's cost analysis cannot see inside a Mosaic
kernel, so the splash step's FLOPs leave out its attention, and it counts a scanned layer
loop's body once. Prints one JSON object.

    python experiments/bench/attention_aot.py                 # the cases below
    python experiments/bench/attention_aot.py --case ladder-0 # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax

from jaxlm import aot, sharding
from jaxlm.configs.overrides import load_config
from jaxlm.platforms import tpu_topology
from jaxlm.run import RunPlan

# name: (preset, topology, overrides). Full remat and bfloat16 compute, as such runs train.
_COMMON = ["model.remat=full", "model.dtype=bfloat16", "mesh.rules=fsdp_tp"]
CASES = {
    "llama3-8b": (
        "llama3-8b",
        "v5p:2x2x2",
        ["mesh.fsdp=8", "data.seq_len=8192", "data.batch_size=8"],
    ),
    **{
        f"ladder-{i}": (
            f"ladder-{i}",
            "v5e:2x2",
            ["mesh.fsdp=4", "data.seq_len=2048", "data.batch_size=16"],
        )
        for i in (0, 3, 5, 7)
    },
}


def compile_step(preset: str, topology: str, overrides: list[str], impl: str) -> dict:
    """Compile the train step of `preset` for `topology` with attention `impl`: its figures."""
    devices = tpu_topology(topology).devices
    config = load_config(preset, [*_COMMON, *overrides, f"model.attention_impl={impl}"])
    mesh = sharding.make_mesh(config.mesh, devices)
    from jaxlm.data.tokenizer import ByteTokenizer

    plan = RunPlan(config, mesh=mesh, tokenizer=ByteTokenizer(), check_data=False)
    figures, text = step_figures(plan)
    return {"impl": impl, **figures, "custom_kernel_in_hlo": "tpu_custom_call" in text}


def step_figures(plan: RunPlan) -> tuple[dict, str]:
    """({argument_bytes, temp_bytes, flops, compile_s} per chip, the compiled program's text) of
    `plan`'s train step, compiled ahead of time for its mesh's devices."""
    start = time.perf_counter()
    compiled = aot.lower_train_step(plan).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    figures = {
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "compile_s": round(seconds, 1),
    }
    return figures, compiled.as_text()


def compile_core(preset: str, topology: str, overrides: list[str], impl: str) -> int:
    """Temporary bytes of the attention core alone (forward + backward of one layer's
    attention at one chip's share of the batch and heads), on one chip of `topology`."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from jaxlm.model.attend import attend
    from jaxlm.model.fused_attention import splash_attention

    device = tpu_topology(topology).devices[0]
    config = load_config(preset, [*_COMMON, *overrides])
    cfg, mesh = config.model, config.mesh
    b = config.data.batch_size // (mesh.data * mesh.fsdp * mesh.expert)
    n, k = cfg.num_heads // mesh.tensor, max(cfg.num_kv_heads // mesh.tensor, 1)
    t, h, dtype = config.data.seq_len, cfg.head_dim, jnp.dtype(cfg.dtype)
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, t, k, h), dtype)

    def core(q_BTNH, k_BTKH, v_BTKH):
        if impl == "splash":
            return splash_attention(q_BTNH, k_BTKH, v_BTKH, None, cfg)
        i = jnp.arange(t)
        mask_BTS = jnp.broadcast_to(i[:, None] >= i[None, :], (b, t, t))
        q_BKGTH = jnp.transpose(q_BTNH.reshape(b, t, k, n // k, h), (0, 2, 3, 1, 4))
        out = attend(q_BKGTH, k_BTKH, v_BTKH, mask_BTS, cfg.attn_logit_softcap, causal=True)
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)

    def loss(*qkv):
        return jnp.sum(core(*qkv).astype(jnp.float32))

    one = Mesh(np.array([device]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)
    with sharding.use_mesh(one, "fsdp"):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def run_case(name: str) -> dict:
    preset, topology, overrides = CASES[name]
    rows = {impl: compile_step(preset, topology, overrides, impl) for impl in ("xla", "splash")}
    core = {impl: compile_core(preset, topology, overrides, impl) for impl in ("xla", "splash")}
    gib = 2.0**30
    return {
        "case": name,
        "topology": topology,
        "overrides": overrides,
        **{f"{impl}_{k}": v for impl, row in rows.items() for k, v in row.items() if k != "impl"},
        "xla_temp_gib": round(rows["xla"]["temp_bytes"] / gib, 3),
        "splash_temp_gib": round(rows["splash"]["temp_bytes"] / gib, 3),
        "temp_ratio_xla_over_splash": round(
            rows["xla"]["temp_bytes"] / max(rows["splash"]["temp_bytes"], 1), 2
        ),
        "core_xla_temp_gib": round(core["xla"] / gib, 3),
        "core_splash_temp_gib": round(core["splash"] / gib, 3),
        # None: splash needed no temporaries at all (everything stays in the kernel's VMEM).
        "core_temp_ratio_xla_over_splash": (
            round(core["xla"] / core["splash"], 1) if core["splash"] else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    args = parser.parse_args()
    results = [run_case(name) for name in args.case or list(CASES)]
    print(json.dumps({"jax": jax.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
