"""Logical axis names, sharding rule sets, mesh construction and logical → physical mapping.

Model code names only logical axes (`"embed"`, `"heads"`, `"act_batch"`, ...). A rule set maps each
logical name to mesh axes; this is the only file that knows the physical mesh axis names.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.configs.run import RULE_SET_NAMES, MeshConfig

MESH_AXES = ("stage", "data", "fsdp", "expert", "context", "tensor")

# A rule maps one logical axis to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch is split over every axis but `context` and `tensor`: outside MoE layers, `expert` is
# data parallel, and outside the pipelined layers (embedding, head, loss) so is `stage`.
BATCH_AXES = ("stage", "data", "fsdp", "expert")
_BATCH = BATCH_AXES

# Parameters: vocab, embed, heads, kv_heads, head_dim, mlp, norm, layers.
# Activations: act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab.
# Every rule set splits the sequence (`act_length`) over `context` (size 1 unless context
# parallelism is on, when a size-1 axis splits nothing); the fsdp sets also shard the weights
# over it, so a context-parallel run keeps one share of the state per chip, as fsdp does.
# Every rule set splits the stacked layers (`layers`) over `stage`: each pipeline stage holds its
# own consecutive layers (`jaxlm.model.pipeline`); the fsdp sets split the other weights (the
# embedding, the head) over the stages too. A dim takes a mesh axis only once, so a layer's
# weights, split over `stage` by `layers`, are not split over it again by `embed`.
RULES_DP: Rules = (("act_batch", _BATCH), ("act_length", "context"), ("layers", "stage"))

RULES_FSDP: Rules = (
    ("act_batch", _BATCH),
    ("act_length", "context"),
    ("layers", "stage"),
    ("embed", ("fsdp", "context", "stage")),
)

RULES_FSDP_TP: Rules = (
    ("act_batch", _BATCH),
    ("act_length", "context"),
    ("layers", "stage"),
    ("embed", ("fsdp", "context", "stage")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Expert parallelism: experts (weights and dispatched tokens) over `expert`.
RULES_FSDP_EP: Rules = (*RULES_FSDP, ("expert", "expert"), ("act_expert", "expert"))

RULES_FSDP_TP_EP: Rules = (
    *RULES_FSDP_TP,
    ("expert", "expert"),
    ("act_expert", "expert"),
    ("expert_mlp", "tensor"),
)

RULE_SETS: dict[str, Rules] = {
    "dp": RULES_DP,
    "fsdp": RULES_FSDP,
    "fsdp_tp": RULES_FSDP_TP,
    "fsdp_ep": RULES_FSDP_EP,
    "fsdp_tp_ep": RULES_FSDP_TP_EP,
}
assert tuple(RULE_SETS) == RULE_SET_NAMES, "keep configs.run.RULE_SET_NAMES in sync"


def get_rules(name: str) -> Rules:
    """The rule set called `name` (one of `RULE_SETS`)."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown sharding rule set {name!r}; choose one of {list(RULE_SETS)}")
    return RULE_SETS[name]


def _resolve(sizes: Sequence[int], total: int, what: str) -> list[int]:
    sizes = list(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(
                f"{what}: the fixed axis sizes {sizes} (product {known}) do not divide "
                f"the {total} available devices"
            )
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"{what}: axis sizes {sizes} multiply to {math.prod(sizes)}, "
            f"but there are {total} devices; make the product {total} or use -1 for one axis"
        )
    return sizes


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` from `config`, over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = [
        config.dcn_stage,
        config.dcn_data,
        config.dcn_fsdp,
        config.dcn_expert,
        config.dcn_context,
        config.dcn_tensor,
    ]
    if -1 in dcn:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    else:
        num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(
            f"MeshConfig DCN axes {dcn} ask for {num_slices} slices, "
            f"which does not divide the {len(devices)} devices"
        )
    dcn = _resolve(
        dcn,
        num_slices,
        "MeshConfig DCN axes (dcn_stage, dcn_data, dcn_fsdp, dcn_expert, dcn_context, dcn_tensor)",
    )
    per_slice = len(devices) // num_slices
    ici = _resolve(
        [config.stage, config.data, config.fsdp, config.expert, config.context, config.tensor],
        per_slice,
        "MeshConfig ICI axes (stage, data, fsdp, expert, context, tensor)",
    )
    if devices and devices[0].platform == "tpu":
        # Each mesh axis on whole torus axes where it can be (e.g. 16 = 4 x 4 of a 4x4x4); an
        # axis that must split a torus axis (2 of a 4) is allowed rather than refused.
        for split in (False, True):
            try:
                if num_slices > 1:
                    grid = mesh_utils.create_hybrid_device_mesh(
                        ici, dcn, devices, allow_split_physical_axes=split
                    )
                else:
                    grid = mesh_utils.create_device_mesh(
                        ici, devices, allow_split_physical_axes=split
                    )
                break
            except NotImplementedError:
                if split:
                    raise
    else:
        # Off TPU there is no torus to respect: devices in the given order, slices outermost
        # (each mesh axis is dcn_size x ici_size, the DCN part varying slowest).
        grid = np.asarray(devices, dtype=object).reshape(dcn + ici)
        n = len(MESH_AXES)
        grid = grid.transpose([a for i in range(n) for a in (i, n + i)]).reshape(
            [d * i for d, i in zip(dcn, ici, strict=True)]
        )
    return Mesh(grid, MESH_AXES)


def _lookup(rules: Rules, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, physical in rules:
        if logical == name:
            if physical is None:
                return ()
            return (physical,) if isinstance(physical, str) else tuple(physical)
    return ()


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """The `PartitionSpec` for an array of `shape` whose dims are named `logical_axes`.

    A mesh axis is used only if it divides the dim (what is left of it after earlier mesh axes) and
    no earlier dim took it; otherwise that dim stays replicated over it. So a 1-kv-head MQA weight
    or a 50257-row vocab is simply not split over `tensor`, rather than failing to compile.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        chosen = []
        for axis in _lookup(rules, name):
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
            used.add(axis)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def logical_to_sharding(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """`NamedSharding`s for a tree of `nn.LogicallyPartitioned` (e.g. `abstract_params`)."""

    def one(leaf: Any) -> NamedSharding:
        boxed = isinstance(leaf, nn.LogicallyPartitioned)
        shape = leaf.value.shape if boxed else leaf.shape
        # Optimizer statistics of another shape (e.g. Adafactor's factored moments) keep their
        # parameter's box but not its axes: those stay replicated.
        names = leaf.names if boxed and len(leaf.names) == len(shape) else (None,) * len(shape)
        return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def without(rules: Rules, axes: Sequence[str]) -> Rules:
    """`rules` with mesh `axes` taken out of every rule (what they would split stays whole)."""
    if not axes:
        return rules
    return tuple(
        (name, tuple(a for a in _lookup(rules, name) if a not in axes) or None) for name, _ in rules
    )


class _Context(threading.local):
    def __init__(self) -> None:
        self.stack: list[tuple[Mesh, Rules]] = []


_context = _Context()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | str) -> Iterator[None]:
    """Within this context (while tracing), `constrain` shards activations over `mesh`."""
    rules = get_rules(rules) if isinstance(rules, str) else rules
    _context.stack.append((mesh, rules))
    try:
        yield
    finally:
        _context.stack.pop()


def current() -> tuple[Mesh, Rules] | None:
    """The innermost `use_mesh` context's (mesh, rules), or None outside one."""
    return _context.stack[-1] if _context.stack else None


def axis_size(axis: str) -> int:
    """The size of mesh axis `axis` in the innermost `use_mesh` context (1 outside one)."""
    ctx = current()
    return 1 if ctx is None else int(dict(ctx[0].shape).get(axis, 1))


def platform() -> str:
    """The platform of the current mesh's devices (the target when compiling ahead of time for
    a TPU topology from a CPU host), else the default backend's."""
    ctx = current()
    return ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], exclude: Sequence[str] = ()
) -> jax.Array:
    """Constrain the sharding of activation `x` by logical axis names; a no-op with no mesh.
    `exclude`: mesh axes the rules may not split `x` over (it is replicated over them)."""
    if not _context.stack:
        return x
    mesh, rules = _context.stack[-1]
    rules = without(rules, exclude)
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def per_device_fraction(params: Any, shardings: Any, min_size: int = 1) -> dict[str, float]:
    """For each leaf with >= `min_size` elements: the fraction of it that one device holds.

    1/num_devices means split over every device, 1.0 means replicated. Keys are '/'-joined paths.
    Used to check that a model is sufficiently sharded (no large weight left whole on a device).
    """
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(shardings)
    for (path, leaf), sharding in zip(flat, flat_shardings, strict=True):
        if math.prod(leaf.shape) < min_size:
            continue
        shard = sharding.shard_shape(leaf.shape)
        split = math.prod(leaf.shape) // math.prod(shard)
        out["/".join(_key_name(k) for k in path)] = 1.0 / split
    return out


def check_sufficiently_sharded(
    params: Any,
    shardings: Any,
    num_devices: int,
    replicable: Sequence[str] = ("norm",),
    tolerance: float = 0.2,
) -> None:
    """Raise if a weight is left whole on every device, or the per-device share is too large.

    Leaves whose path contains one of `replicable` (norm scales and biases) may be replicated.
    The per-device share of all elements must be at most (1 + tolerance) / num_devices.
    """
    fractions = per_device_fraction(params, shardings)
    whole = [k for k, f in fractions.items() if f == 1.0 and not any(r in k for r in replicable)]
    if whole and num_devices > 1:
        raise ValueError(f"parameters replicated on every device: {whole}")
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
    share = sum(f * n for f, n in zip(fractions.values(), sizes, strict=True)) / sum(sizes)
    if share > (1 + tolerance) / num_devices:
        raise ValueError(
            f"each device holds {share:.1%} of the parameters; at most "
            f"{(1 + tolerance) / num_devices:.1%} expected on {num_devices} devices"
        )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
