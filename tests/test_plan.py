"""`jaxlm plan` (`jaxlm.aot`, `jaxlm.hlo`): collective bytes read from compiled TPU programs
against hand counts, the candidate layouts against a brute-force enumeration, a recommended
layout that really compiles and fits on a small topology (and comes back from the figures
cache), the refusals (nothing fits, with the bytes; an unknown topology; bad flags), and a
layout whose state fits on every preset's intended pod."""

import itertools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import aot, cli, hlo, sharding
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.configs.presets import PRESETS
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.metrics import param_count
from jaxlm.run import RunPlan

GIB = 2.0**30
TINY = ["--config", "tiny-llama", "--set", "model.num_layers=4", "--seq-len", "128"]


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out


def test_collective_bytes_multiply_out_loops_and_split_ici_from_dcn():
    """Per chip: 8 all-gathers of a [1024, 1024] bfloat16 weight split 4 ways in a scan send
    8 x 2 MiB x 3/4 over ICI; across 2 slices, 3 iterations of a permute of 1024 float32 values
    between the slices send 3 x 4 KiB over DCN."""
    mesh = Mesh(np.array(aot.topology_devices("v5e:2x2")), ("x",))

    def gathers(w, x):
        def body(h, _):
            full = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
            return jnp.tanh(h @ full), None

        return jax.lax.scan(body, x, None, length=8)[0].sum()

    w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    program = jax.jit(gathers).lower(w, x).compile().as_text()
    assert hlo.collective_bytes(program) == {"ici": 8 * 1024 * 1024 * 2 * 3 / 4, "dcn": 0.0}

    devices = np.array(aot.topology_devices("v5e:2x2", 2)).reshape(2, 4)
    two = Mesh(devices, ("slice", "x"))

    def swap(v):
        def body(_, v):
            return jax.lax.ppermute(v, "slice", [(0, 1), (1, 0)]) * 1.5

        return jax.lax.fori_loop(0, 3, body, v)

    spec = P(("slice", "x"))
    f = jax.shard_map(swap, mesh=two, in_specs=spec, out_specs=spec)
    v = jax.ShapeDtypeStruct((8 * 1024,), jnp.float32, sharding=NamedSharding(two, spec))
    moved = hlo.collective_bytes(jax.jit(f).lower(v).compile().as_text())
    assert moved == {"ici": 0.0, "dcn": 3 * 1024 * 4}


def test_candidates_are_every_layout_that_divides_the_run():
    """Against a brute force over all 6-axis factorizations of 8 chips with the same rules."""
    config = load_config("tiny-moe", ["model.num_layers=4", "data.batch_size=16"])
    got = {
        (tuple(sorted(c.ici.items())), c.microbatches)
        for c in aot.candidates(config, 8, 1, ("full",))
    }
    want = set()
    for stage, fsdp, expert, context, tensor in itertools.product([1, 2, 4, 8], repeat=5):
        if stage * fsdp * expert * context * tensor != 8 or context > 1:  # 128 tokens: no context
            continue
        if 4 % stage or 4 % expert or 4 % tensor:  # 4 layers, 4 experts, 4 heads
            continue
        if 16 % (stage * fsdp * expert):
            continue
        inner = fsdp * expert
        m = next((k * stage for k in (4, 2, 1) if 16 % (k * stage * inner) == 0), None)
        if stage > 1 and m is None:
            continue
        ici = dict(stage=stage, fsdp=fsdp, expert=expert, context=context, tensor=tensor)
        want.add((tuple(sorted(ici.items())), m if stage > 1 else None))
    assert got == want


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-cache")


def test_plan_recommends_a_layout_that_compiles_and_fits(planned, capsys, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(planned))
    rc, out = _cli(
        capsys, "plan", *TINY, "--batch", "16", "--topology", "v5e:2x2", "--remat",
        "none,full", "--json",
    )  # fmt: skip
    assert rc == 0, out.err
    result = json.loads(out.out)
    rows = result["layouts"]
    assert {r["status"] for r in rows} <= {"compiled", "skipped: remat=none fits"}
    assert any(r["layout"].startswith("stage2xfsdp2 ") for r in rows)  # pipelines are candidates
    compiled = [r for r in rows if r["status"] == "compiled"]
    best = result["recommended"]
    assert best == min((r for r in compiled if r["fits"]), key=lambda r: r["step_seconds"])
    for r in compiled:  # the figures of the estimate are the roofline's
        chip = result["chip"]
        want = (
            r["flops"] / chip["peak_flops"]
            + r["ici_bytes"] / chip["ici_bytes_per_s"]
            + r["dcn_bytes"] / aot.DCN_BYTES_PER_S
        )
        assert r["step_seconds"] == pytest.approx(want)
        assert r["dcn_bytes"] == 0.0  # one slice
    # The recommendation, compiled again from its flags alone, has the bytes the plan said.
    devices = aot.topology_devices("v5e:2x2")
    config = load_config("tiny-llama", ["model.num_layers=4", "data.seq_len=128"])
    config = apply_overrides(config, ["data.batch_size=16", *best["overrides"]])
    plan = RunPlan(config, mesh=sharding.make_mesh(config.mesh, devices), tokenizer=ByteTokenizer())
    memory = aot.lower_train_step(plan).compile().memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    assert total == best["total_bytes"] <= 16 * GIB

    # Again: every figure comes from the cache, and the table names the same layout.
    rc, out = _cli(
        capsys, "plan", *TINY, "--batch", "16", "--topology", "v5e:2x2", "--remat", "none,full"
    )  # fmt: skip
    assert rc == 0
    assert "compiled (cached)" in out.out and " compiled\n" not in out.out
    assert f"recommended: {best['layout']} " in out.out
    flags = " ".join(f"--set {o}" for o in best["overrides"] if not o.endswith("=1"))
    assert flags in out.out


def test_a_pipeline_over_slices_sends_activations_over_dcn(capsys, monkeypatch, tmp_path):
    """2 slices: the slices as stages send over DCN (activations and their gradients), and the
    plan reports it for every layout that spans the slices."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    rc, out = _cli(
        capsys, "plan", *TINY, "--batch", "16", "--topology", "v5e:2x2", "--slices", "2",
        "--remat", "full", "--max-compiles", "3", "--json",
    )  # fmt: skip
    assert rc == 0, out.err
    rows = json.loads(out.out)["layouts"]
    compiled = {r["layout"]: r for r in rows if r["status"] == "compiled"}
    assert set(compiled) == {f"fsdp4xdcn_{a}2 remat=full" for a in ("data", "fsdp")} | {
        "fsdp4xdcn_stage2 remat=full m4"
    }
    assert all(r["dcn_bytes"] > 0 for r in compiled.values())
    assert sum(r["status"] == "not compiled (--max-compiles)" for r in rows) >= 1


def test_a_run_no_layout_fits_is_refused_with_the_bytes_before_compiling(capsys):
    """llama3-8b on 4 v5e chips: its float32 weights and Adam moments (12 bytes a parameter)
    alone exceed 16 GiB per chip in every layout; the refusal names the smallest."""
    rc, out = _cli(
        capsys, "plan", "--config", "llama3-8b", "--topology", "v5e:2x2", "--batch", "4",
        "--seq-len", "1024", "--json",
    )  # fmt: skip
    assert rc == 2
    message = out.err.strip().splitlines()[-1]
    assert "no layout fits v5e:2x2: v5e has 16.0 GiB of HBM per chip; the smallest, " in message
    assert "GiB per chip (state alone)" in message
    need = float(re.search(r"needs ([0-9.]+) GiB", message).group(1))
    want = param_count(PRESETS["llama3-8b"]).total * 12 / 4 / GIB
    assert need == pytest.approx(want, rel=0.01)
    assert "compiled" not in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--topology", "v9z:2x2"],
            "cannot describe TPU topology 'v9z:2x2' (e.g. 'v5p:2x2x1', 'v5e:4x4')",
        ),
        (["--topology", "v5e:2x2", "--remat", "some"], "--remat 'some': choose from none, full"),
        (["--topology", "v5e:2x2", "--batch", "0"], "--batch 0 must be >= 1"),
        (["--topology", "v5e:2x2", "--slices", "0"], "--slices 0 must be an integer >= 1"),
        (["--topology", "v5e:2x2", "--max-compiles", "0"], "--max-compiles 0 must be >= 1"),
        (
            ["--topology", "v5e:2x2", "--set", "model.position=learned", "--seq-len", "4096"],
            "no layout could be compiled for v5e:2x2: refused: data.seq_len=4096 exceeds "
            "model.max_seq_len=128",
        ),
        (
            ["--topology", "v5e:2x2", "--slices", "2", "--batch", "3"],
            "no layout of 8 chips divides this run: batch 3",
        ),
    ],
)
def test_bad_plan_flags_are_refused(capsys, argv, message):
    rc, out = _cli(capsys, "plan", *TINY, *argv)
    assert rc == 2
    assert message in out.err


def test_every_preset_has_a_layout_whose_state_fits_its_intended_pod():
    """Without compiling (the benchmark `experiments/bench/plan_presets.py` compiles them): on
    `aot.INTENDED_PODS`, every preset has a layout whose parameters and optimizer state fit."""
    assert set(aot.INTENDED_PODS) == set(PRESETS)
    for name, (topology, seq_len, batch) in aot.INTENDED_PODS.items():
        config = load_config(
            name,
            [f"data.seq_len={seq_len}", f"data.batch_size={batch}"]
            + [f"model.max_seq_len={seq_len}"] * (seq_len > PRESETS[name].max_seq_len),
        )
        hbm = aot.chip_of(aot.topology_devices(topology)[0]).hbm_bytes
        rows = aot.plan_layouts(config, topology, remats=("full",), max_compiles=0)["layouts"]
        fits = [r for r in rows if r.get("state_bytes", math.inf) <= hbm]
        assert fits, (name, [r["status"] for r in rows])
