"""Post-training weight quantization: float parameters -> int8 / packed int4 values and scales
in the layout `jaxlm.model.quant` reads, sharded by the quantized model's logical axes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig
from jaxlm.configs.quant import QuantConfig
from jaxlm.model import quant as q
from jaxlm.model.lora import merge_lora
from jaxlm.model.transformer import abstract_params, param_shardings


def quantized_config(config: ModelConfig, quant: QuantConfig) -> ModelConfig:
    """`config` with `quant` (stored: QAT's fake quantization is dropped); raises for an
    already-quantized model, or a group size the model's dims do not take."""
    if config.quant.stored:
        raise ValueError(
            f"this model is already quantized (model.quant: {config.quant.describe()}); quantize "
            "the float run it came from"
        )
    if not quant.bits:
        raise ValueError("quantize needs bits=8 or bits=4 (bits=0 keeps float weights)")
    return dataclasses.replace(config, quant=dataclasses.replace(quant, qat=False))


def quantize_tree(params: Any, target: Any, bits: int) -> Any:
    """`params` (float) in the structure of `target` (the quantized model's parameter shapes):
    each `name_q` / `name_scale` pair of `target` from the float `name`, the rest as they are."""
    out = {}
    for key, want in target.items():
        if isinstance(want, dict):
            out[key] = quantize_tree(params[key], want, bits)
        elif key.endswith("_scale") and f"{key[: -len('_scale')]}_q" in target:
            continue  # written with its values
        elif key.endswith("_q") and f"{key[:-2]}_scale" in target:
            name = key[:-2]
            w = params[name]
            values, scale = q.quantize(w, target[f"{name}_scale"].shape, bits)
            if bits == 4:
                axis = next(
                    i for i, (a, b) in enumerate(zip(w.shape, want.shape, strict=True)) if a != b
                )
                values = q.pack_int4(values, axis)
            out[key], out[f"{name}_scale"] = values, scale
        else:
            out[key] = params[key]
            if tuple(want.shape) != tuple(params[key].shape):
                raise ValueError(f"{key}: shape {params[key].shape} where {want.shape} is expected")
    return out


def quantize_params(
    config: ModelConfig,
    params: Any,
    quant: QuantConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: str = "fsdp",
) -> tuple[ModelConfig, Any]:
    """(the quantized model's config, its parameters): LoRA adapters merged into their weights
    first, then every projection `quant` covers quantized; the result created in its shardings
    on `mesh` (default: where `params` are, unsharded)."""
    qconfig = quantized_config(config, quant)
    if config.lora.rank:
        config, params = merge_lora(config, params)
        qconfig = dataclasses.replace(qconfig, lora=config.lora)
    target = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x,
        abstract_params(qconfig),
        is_leaf=lambda x: hasattr(x, "names"),
    )
    run = jax.jit(lambda p: quantize_tree(p, target, quant.bits))
    if mesh is not None:
        shardings = param_shardings(qconfig, mesh, rules)
        run = jax.jit(lambda p: quantize_tree(p, target, quant.bits), out_shardings=shardings)
        with sharding.use_mesh(mesh, rules):
            return qconfig, run(params)
    return qconfig, run(params)


def stored_bytes(params: Any) -> int:
    """Bytes of a parameter tree as stored (int8 and packed int4 at one byte per element)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def quantize_workdir(
    workdir: str | Path,
    out: str | Path,
    quant: QuantConfig,
    *,
    step: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the run at `workdir` (its newest checkpoint that restores, or `step`) as a new run
    `out` with quantized weights: a step-0 checkpoint that `jaxlm sample` / `eval` / `score` read
    as they read any run. LoRA adapters are merged first. Refusals (an already-quantized run, a
    group size the model does not take, an `out` that holds a run) come before anything is
    read or written."""
    from jaxlm import checkpoint
    from jaxlm.interop.workdir import write_workdir
    from jaxlm.run import load_for_eval

    saved = checkpoint.load_run_config(workdir)
    quantized_config(saved.model, quant)  # refusals before the weights are read
    out = Path(out).absolute()
    if checkpoint.complete_steps(out) or (out / checkpoint.CONFIG_FILE).exists():
        raise ValueError(f"--out {str(out)!r} already holds a jaxlm run; give a new directory")
    config, mesh, params, tokenizer = load_for_eval(workdir, step, log)
    qconfig, qparams = quantize_params(
        config.model, params, quant, mesh=mesh, rules=config.mesh.rules
    )
    del params
    # The new run reads like its source (data, tokenizer, mesh); it never trains by itself, so
    # its step 0 is where its schedule starts.
    run = dataclasses.replace(config, model=qconfig)
    return write_workdir(
        out,
        qconfig,
        lambda mesh, rules: qparams,
        run_config=run,
        mesh=mesh,
        rules=config.mesh.rules,
        tokenizer=tokenizer,
    )
