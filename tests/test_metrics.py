"""FLOPs per token against matmul FLOPs counted from the traced program; the metric writer."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from jaxlm.configs import get_preset
from jaxlm.metrics import flops_per_token, param_count, training_state_bytes
from jaxlm.model.transformer import Transformer
from tests.random_params import random_params

ROOT = Path(__file__).resolve().parents[1]


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _dot_flops(jaxpr) -> int:
    """2 * (output elements) * (contracted size) summed over every dot_general, scans unrolled."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                total += times * _dot_flops(sub)
    return total


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny", {}),
        ("tiny-llama", {}),
        ("tiny-llama", dict(num_kv_heads=1, head_dim=32, scan_layers=False)),
        ("tiny", dict(tie_embeddings=False, activation="geglu", num_layers=3)),
    ],
)
def test_flops_per_token_matches_the_traced_matmuls(name, changes):
    cfg = dataclasses.replace(get_preset(name), **changes)
    b, t = 2, 32
    params = random_params(cfg)
    tokens = jnp.zeros((b, t), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0])(params)
    forward = _dot_flops(jaxpr.jaxpr)
    # Training = forward + backward (2x forward) = 3x the forward matmuls.
    assert flops_per_token(cfg, t) * b * t == 3 * forward


def test_non_embedding_count_excludes_token_position_and_output_tables():
    cfg = get_preset("gpt2-124m")
    counts = param_count(cfg)
    assert counts.embedding == 50257 * 768 + 1024 * 768  # tied: the output reuses wte
    assert counts.non_embedding == 85_056_000  # the commonly quoted "85M" for GPT-2 small


def test_training_state_bytes():
    cfg = dataclasses.replace(get_preset("tiny"), param_dtype="bfloat16")
    n = param_count(cfg).total
    assert training_state_bytes(cfg) == {"params": 2 * n, "optimizer": 8 * n}


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    # tensorboardX imports torch where installed (seconds, hundreds of MB); jaxlm keeps it out,
    # and torch still imports afterwards for whoever wants it.
    code = (
        "import sys; from jaxlm.metrics import MetricWriter; "
        f"w = MetricWriter({str(tmp_path)!r}); w.write(3, {{'loss': 1.5}}); w.close(); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "import importlib.util; assert importlib.util.find_spec('torch') is None or "
        "__import__('torch').tensor(1.0).item() == 1.0"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert b"loss" in events.read_bytes()
