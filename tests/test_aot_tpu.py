"""Ahead-of-time compiles for a TPU topology on this CPU machine (libtpu from the `tpu` extra)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.configs import MeshConfig, get_preset
from jaxlm.model.transformer import Transformer, abstract_params, param_shardings

pytest.importorskip("libtpu", reason="needs jax[tpu]: pip install -e '.[tpu]'")

TOPOLOGY = "v5e:2x4"
PRESET = "ladder-0"


@pytest.fixture(scope="module")
def compiled_grad():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2, rules="fsdp_tp"), devices)
    cfg = get_preset(PRESET)
    shardings = param_shardings(cfg, mesh, "fsdp_tp")
    shapes = nn.meta.unbox(abstract_params(cfg))
    params = jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shardings, shapes
    )
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=batch)

    def loss(p, t):
        return jnp.mean(jax.nn.logsumexp(Transformer(cfg).apply({"params": p}, t)[0], axis=-1))

    with sharding.use_mesh(mesh, "fsdp_tp"):
        step = jax.jit(jax.grad(loss), in_shardings=(shardings, batch), out_shardings=shardings)
        return step.lower(params, tokens).compile()


def test_sharded_gradient_compiles_for_tpu_with_params_split_per_chip(compiled_grad):
    """Per-chip argument bytes are the 1/8 share `jaxlm info --topology` predicts (+ padding)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "jaxlm",
        "info",
        "--config",
        PRESET,
        "--topology",
        TOPOLOGY,
        "--set",
        "mesh.fsdp=4",
        "--set",
        "mesh.tensor=2",
        "--set",
        "mesh.rules=fsdp_tp",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    predicted = json.loads(out.stdout)["params_bytes_per_device"]
    memory = compiled_grad.memory_analysis()
    tokens_per_chip = 8 * 256 * 4 // 8
    # TPU tiles pad small arrays (norm scales), so allow a few percent above the prediction.
    assert predicted + tokens_per_chip <= memory.argument_size_in_bytes <= 1.1 * predicted
    assert memory.output_size_in_bytes <= 1.1 * predicted  # gradients come back sharded too
    total = 4 * sum(
        x.size for x in jax.tree.leaves(nn.meta.unbox(abstract_params(get_preset(PRESET))))
    )
    assert predicted < total / 8 * 1.05


def test_train_step_of_a_1b_model_compiles_for_tpu_v5e_and_fits(capsys):
    """llama3.2-1b, fsdp 2 x tensor 2 on v5e:2x2, bf16 compute, full remat: memory per chip."""
    from jax.experimental import topologies

    from jaxlm.configs.overrides import load_config
    from jaxlm.metrics import param_count
    from jaxlm.run import abstract_batch, abstract_train_state, make_train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    cfg = load_config(
        "llama3.2-1b",
        [
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "mesh.rules=fsdp_tp",
            "data.seq_len=512",
            "data.batch_size=4",
            "model.remat=full",
            "model.dtype=bfloat16",
        ],
    )
    mesh = sharding.make_mesh(cfg.mesh, devices)
    step = make_train_step(cfg, mesh)
    with sharding.use_mesh(mesh, cfg.mesh.rules):
        lowered = step.jitted.lower(abstract_train_state(cfg, mesh), abstract_batch(cfg, mesh))
    memory = lowered.compile().memory_analysis()
    gib = 2**30
    with capsys.disabled():
        print(
            f"\nllama3.2-1b train_step on v5e:2x2 per chip: arguments "
            f"{memory.argument_size_in_bytes / gib:.2f} GiB, temporaries "
            f"{memory.temp_size_in_bytes / gib:.2f} GiB, "
            f"donated {memory.alias_size_in_bytes / gib:.2f} GiB"
        )
    state_bytes = param_count(cfg.model).total * (4 + 8)  # f32 params + two f32 Adam moments
    assert state_bytes / 4 <= memory.argument_size_in_bytes <= 1.05 * state_bytes / 4
    # The old state is donated: the update is written in place, not next to a second copy.
    assert memory.alias_size_in_bytes >= 0.99 * memory.argument_size_in_bytes - 2**20
    # Fits a v5e chip's 16 GiB of HBM with room to spare.
    assert memory.argument_size_in_bytes + memory.temp_size_in_bytes < 12 * gib


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_parallel_moe_train_step_compiles_for_tpu(dispatch):
    """The whole MoE train step (both dispatch paths) partitions over data x expert on a TPU
    topology; on TPU `ragged_dot` stays a grouped op (unlike CPU's dense fallback)."""
    from jax.experimental import topologies

    from jaxlm.configs.overrides import load_config
    from jaxlm.run import abstract_batch, abstract_train_state, make_train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
    cfg = load_config(
        "tiny-moe",
        [
            "mesh.data=2",
            "mesh.fsdp=1",
            "mesh.expert=4",
            "mesh.rules=fsdp_ep",
            f"model.moe.dispatch={dispatch}",
            "data.batch_size=16",
        ],
    )
    mesh = sharding.make_mesh(cfg.mesh, devices)
    step = make_train_step(cfg, mesh)
    with sharding.use_mesh(mesh, cfg.mesh.rules):
        compiled = step.jitted.lower(
            abstract_train_state(cfg, mesh), abstract_batch(cfg, mesh)
        ).compile()
    text = compiled.as_text()
    # Expert weights [E=4, D, F] are split over the expert axis: one expert per chip.
    state = abstract_train_state(cfg, mesh)
    up = state.params["layers"]["moe"]["up"]
    assert up.sharding.shard_shape(up.shape)[1] == 1, up.sharding
    if dispatch == "dropless":
        assert "ragged" in text.lower()


def test_splash_train_step_compiles_for_tpu_with_less_memory_than_xla(capsys):
    """The shard_map-wrapped splash kernel in a whole fsdp x tensor train step on v5e:2x2: a
    Mosaic custom call in the HLO, and clearly smaller temporaries than the XLA path at a long
    sequence; `jaxlm info --topology` says splash."""
    from jax.experimental import topologies

    from jaxlm.cli import main
    from jaxlm.configs.overrides import load_config
    from jaxlm.run import abstract_batch, abstract_train_state, make_train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    overrides = [
        "mesh.fsdp=2",
        "mesh.tensor=2",
        "mesh.rules=fsdp_tp",
        "model.max_seq_len=4096",
        "data.seq_len=4096",
        "data.batch_size=8",
        "model.d_model=256",
        "model.num_heads=8",
        "model.num_kv_heads=2",
        "model.dtype=bfloat16",
    ]
    temp, texts = {}, {}
    for impl in ("xla", "splash"):
        cfg = load_config("tiny-llama", [*overrides, f"model.attention_impl={impl}"])
        mesh = sharding.make_mesh(cfg.mesh, devices)
        step = make_train_step(cfg, mesh)
        with sharding.use_mesh(mesh, cfg.mesh.rules):
            lowered = step.jitted.lower(abstract_train_state(cfg, mesh), abstract_batch(cfg, mesh))
        compiled = lowered.compile()
        temp[impl] = compiled.memory_analysis().temp_size_in_bytes
        texts[impl] = compiled.as_text()
    assert "tpu_custom_call" in texts["splash"] and "tpu_custom_call" not in texts["xla"]
    with capsys.disabled():
        ratio = temp["xla"] / temp["splash"]
        print(f"\n8-head model, seq 4096, train step temporaries per chip: xla {temp['xla']:,} B")
        print(f"splash {temp['splash']:,} B ({ratio:.1f}x less)")
    assert temp["splash"] * 3 < temp["xla"]
    args = ["info", "--config", "tiny-llama", "--topology", "v5e:2x2", "--json"]
    assert main([*args, "--set", "model.max_seq_len=4096"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attention_impl"] == "splash", info
