"""Pipeline parallelism: the scanned layers split into stages over the `stage` mesh axis.

The stacked layer parameters keep their shape; their `layers` dim is split over `stage` (every
rule set maps it there), so stage s holds the consecutive layers s * L/S .. (s + 1) * L/S - 1 and
a checkpoint is the same with or without stages. With `repeats` R > 1 (a circular pipeline) the
layers are cut into R * S chunks, chunk r * S + s run by stage s on the microbatches' r-th trip
round the stages; those chunks are not consecutive in the stored order, so each step reshuffles
the layer weights over `stage` (an all-to-all) before the loop and the gradients back after it.

A batch of B rows flows through as M microbatches (row j of microbatch m is row j * M + m, so
every data shard feeds every microbatch). At time step t, stage s runs microbatch (t - s) mod M
on its trip (t - s) // M: every stage at once, as one computation vmapped over a stage axis that
is split over the `stage` mesh axis (`jax.vmap(spmd_axis_name=...)`). Stage s's input is stage
s - 1's output of the step before (a shift along the stage axis, a collective permute); stage 0
reads microbatch t mod M from a buffer that holds the batch and takes back the last stage's
outputs, so a microbatch's next trip starts where its last ended (M >= S lets each output arrive
before it is needed). R * M + S - 1 steps; in the first and last S - 1 some stages idle on
inputs that go nowhere: the bubble, `bubble_fraction` of the time.

Outside the layers (embedding, head, loss) `stage` is one more data-parallel axis
(`sharding.BATCH_AXES`). Auxiliary outputs (MoE losses) are each layer's mean over microbatches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig

AXIS = "stage"
_ACT = ("act_batch", "act_length", "act_embed")


def stages() -> int:
    """The number of pipeline stages of the current mesh (1 outside one)."""
    return sharding.axis_size(AXIS)


def microbatches(config: ModelConfig, num_stages: int) -> int:
    """The microbatches a batch is cut into (`model.pipeline_microbatches`; default one per
    stage)."""
    return config.pipeline_microbatches or num_stages


def bubble_fraction(num_stages: int, num_microbatches: int, repeats: int = 1) -> float:
    """The fraction of the schedule's stage-steps spent idle: (S - 1) / (R * M + S - 1)."""
    return (num_stages - 1) / (repeats * num_microbatches + num_stages - 1)


def units(config: ModelConfig) -> int:
    """The scanned units (layers, or groups of `moe.every` layers when MoE layers are sparse)."""
    grouped = config.moe.enabled and config.moe.every > 1
    return config.num_layers // (config.moe.every if grouped else 1)


def check(config: ModelConfig, mesh_shape: dict[str, int], batch: int) -> None:
    """Refuse a pipeline that cannot run: `batch` rows per step through the stages of a mesh of
    `mesh_shape`, before anything is compiled."""
    s = int(mesh_shape.get(AXIS, 1))
    if s == 1:
        return
    r, m = config.pipeline_repeats, microbatches(config, s)
    if not config.scan_layers:
        raise ValueError(
            f"mesh.stage={s} splits the scanned layers into stages; set model.scan_layers=True"
        )
    n = units(config)
    if n % (s * r):
        what = "layers" if n == config.num_layers else f"groups of moe.every={config.moe.every}"
        valid = [k for k in range(1, n + 1) if n % (k * r) == 0]
        raise ValueError(
            f"mesh.stage={s} x model.pipeline_repeats={r} does not divide the {n} {what} "
            f"(model.num_layers={config.num_layers}); stage counts that do: {valid}"
        )
    if r > 1 and m < s:
        raise ValueError(
            f"a circular pipeline (model.pipeline_repeats={r}) needs at least one microbatch per "
            f"stage: model.pipeline_microbatches={m} < mesh.stage={s}"
        )
    inner = math.prod(int(mesh_shape.get(a, 1)) for a in sharding.BATCH_AXES if a != AXIS)
    if batch % (m * inner):
        raise ValueError(
            f"the batch of {batch} rows per step cannot be cut into model.pipeline_microbatches="
            f"{m} microbatches split {inner} ways (the data-parallel axes within a stage); "
            f"use a multiple of {m * inner} rows"
        )
    if int(mesh_shape.get("context", 1)) > 1:
        raise ValueError(
            f"mesh.stage={s} with mesh.context={mesh_shape['context']}: pipeline and context "
            "parallelism do not combine yet; use one of them"
        )
    for name, value in (
        ("model.dropout", config.dropout),
        ("model.lora.dropout", config.lora.dropout),
        ("model.moe.router_jitter", config.moe.router_jitter),
    ):
        if value:
            raise ValueError(
                f"{name}={value} draws random numbers inside the layers, which the pipeline "
                f"(mesh.stage={s}) does not pass to its stages; set it to 0"
            )


def _stage_spec(mesh: Any, rules: Any, shape: tuple[int, ...], names: tuple) -> PartitionSpec:
    inner = sharding.logical_to_spec(names, shape[1:], mesh, rules)
    return PartitionSpec(AXIS, *inner)


def run(
    layer: Callable[[Any, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    x_BTD: jax.Array,
    rows: Any,
    *,
    num_microbatches: int,
    repeats: int = 1,
    policy: Any = None,
    gather: Any = None,
    dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stacked units of `params` (leaves [N, ...]) applied in order to `x_BTD`, pipelined
    over the current mesh's `stage` axis. `layer(unit params, x [b, T, D], rows of x)` returns
    (x, aux); `rows` is a tree of arrays whose first dim is x's rows (positions, the mask).
    `policy`: a remat policy for each unit (None: no remat). `gather`: a tree like `params` of
    each weight's logical axes past the first: the weights are then gathered within each stage
    (split over `tensor` and `expert` only) once, before the schedule, and cast to `dtype` if it
    is narrower. Returns (x, aux stacked [N, ...])."""
    mesh, outer = sharding.current()
    s, m, r = stages(), num_microbatches, repeats
    n = jax.tree.leaves(params)[0].shape[0]
    b = x_BTD.shape[0]
    if n % (s * r) or b % m:
        raise ValueError(f"{n} units on {s} stages x {r} repeats, {b} rows in {m} microbatches")
    chunk, per = n // (s * r), b // m
    rules = sharding.without(outer, (AXIS,))  # within a stage, `stage` splits nothing

    def split(a: jax.Array) -> jax.Array:  # [B, ...] -> [M, B / M, ...]: row j * M + m
        return jnp.swapaxes(a.reshape(per, m, *a.shape[1:]), 0, 1)

    # Unit (r * S + s) * chunk + c at [s, r, c]: stage-major, split over `stage`.
    def stage_major(p: jax.Array) -> jax.Array:
        p = jnp.swapaxes(p.reshape(r, s, chunk, *p.shape[1:]), 0, 1)
        rest = (PartitionSpec.UNCONSTRAINED,) * (p.ndim - 1)
        return jax.lax.with_sharding_constraint(p, NamedSharding(mesh, PartitionSpec(AXIS, *rest)))

    stage_params = jax.tree.map(stage_major, params)
    if gather is not None:
        whole = sharding.without(outer, (AXIS, "data", "fsdp", "context"))

        def gathered(names: tuple | None, p: jax.Array) -> jax.Array:
            if names is None:
                return p
            if dtype is not None and jnp.issubdtype(p.dtype, jnp.floating):
                p = p.astype(dtype) if jnp.dtype(dtype).itemsize < p.dtype.itemsize else p
            spec = sharding.logical_to_spec(names, p.shape[3:], mesh, whole)
            spec = PartitionSpec(AXIS, None, None, *spec)
            return jax.lax.with_sharding_constraint(p, NamedSharding(mesh, spec))

        stage_params = jax.tree.map(
            gathered, gather, stage_params, is_leaf=lambda n: n is None or isinstance(n, tuple)
        )

    def unit(x: jax.Array, p: Any, rows_s: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return layer(p, x, rows_s)

    if policy is not None:
        unit = jax.checkpoint(unit, policy=policy)

    def stage(p_s: Any, trip: jax.Array, x: jax.Array, rows_s: Any) -> tuple[jax.Array, Any]:
        p_s = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, trip, 0, False), p_s)
        return jax.lax.scan(lambda h, p: unit(h, p, rows_s), x, p_s)

    staged = jax.vmap(stage, spmd_axis_name=AXIS)

    with sharding.use_mesh(mesh, rules):
        state_shape = (s, per, *x_BTD.shape[1:])
        state_sharding = NamedSharding(mesh, _stage_spec(mesh, rules, state_shape, _ACT))
        # The buffer is whole on every stage (split over the data axes only): stage 0 reads
        # from it and the last stage writes to it at every step.
        buffer_spec = sharding.logical_to_spec(
            (None, *_ACT), (m, per, *x_BTD.shape[1:]), mesh, rules
        )
        buffer_sharding = NamedSharding(mesh, buffer_spec)
        buffer = jax.lax.with_sharding_constraint(split(x_BTD), buffer_sharding)
        rows_m = jax.tree.map(split, rows)
        stage_ids = jnp.arange(s)
        probe = jax.tree.map(lambda a: a[:s], rows_m)
        _, aux_shape = jax.eval_shape(
            staged, stage_params, stage_ids, jnp.zeros(state_shape, x_BTD.dtype), probe
        )
        # aux [S, chunk, ...] per step, summed into [S, R, chunk, ...] over the valid steps.
        aux0 = jax.tree.map(lambda a: jnp.zeros((s, r, *a.shape[1:]), jnp.float32), aux_shape)

        def step(carry: Any, t: jax.Array) -> tuple[Any, None]:
            state, buffer, aux_acc = carry
            buffer = jax.lax.with_sharding_constraint(buffer, buffer_sharding)
            age = t - stage_ids  # how many steps ago stage s's microbatch entered stage 0
            valid = (age >= 0) & (age < r * m)
            trip = jnp.clip(age // m, 0, r - 1)
            first = jax.lax.dynamic_index_in_dim(buffer, t % m, 0, keepdims=True)
            inputs = jnp.concatenate([first.astype(state.dtype), state[:-1]], axis=0)
            inputs = jax.lax.with_sharding_constraint(inputs, state_sharding)
            rows_s = jax.tree.map(lambda a: a[age % m], rows_m)
            out, aux = staged(stage_params, trip, inputs, rows_s)
            out = jax.lax.with_sharding_constraint(out, state_sharding)
            done = age[-1]  # the last stage's microbatch, finished now (if valid)
            slot = done % m
            old = jax.lax.dynamic_index_in_dim(buffer, slot, 0, keepdims=False)
            new = jnp.where(valid[-1], out[-1].astype(buffer.dtype), old)
            buffer = jax.lax.dynamic_update_index_in_dim(buffer, new, slot, 0)
            buffer = jax.lax.with_sharding_constraint(buffer, buffer_sharding)

            def accumulate(acc: jax.Array, a: jax.Array) -> jax.Array:
                keep = valid.reshape((s,) + (1,) * (a.ndim - 1))
                a = jnp.where(keep, a.astype(jnp.float32), 0.0) / m
                return acc.at[stage_ids, trip].add(a)

            aux_acc = jax.tree.map(accumulate, aux_acc, aux)
            return (out, buffer, aux_acc), None

        state0 = jax.lax.with_sharding_constraint(
            jnp.zeros(state_shape, x_BTD.dtype), state_sharding
        )
        (_, buffer, aux_acc), _ = jax.lax.scan(
            step, (state0, buffer, aux0), jnp.arange(r * m + s - 1)
        )
    x_BTD = jnp.swapaxes(buffer, 0, 1).reshape(x_BTD.shape)
    x_BTD = sharding.constrain(x_BTD, _ACT)
    # [S, R, chunk, ...] -> unit (r * S + s) * chunk + c
    aux = jax.tree.map(
        lambda a, like: jnp.swapaxes(a, 0, 1).reshape(n, *a.shape[3:]).astype(like.dtype),
        aux_acc,
        aux_shape,
    )
    return x_BTD, aux


def schedule(num_stages: int, num_microbatches: int, repeats: int = 1) -> np.ndarray:
    """[steps, stages]: the microbatch each stage runs at each step of the schedule (-1: idle),
    for reports and tests."""
    t = np.arange(repeats * num_microbatches + num_stages - 1)[:, None]
    age = t - np.arange(num_stages)[None, :]
    valid = (age >= 0) & (age < repeats * num_microbatches)
    return np.where(valid, age % num_microbatches, -1)
