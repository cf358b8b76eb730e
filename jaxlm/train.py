"""`TrainState`, sharded init, the jitted `train_step` (gradient accumulation), `eval_step`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import losses, sharding
from jaxlm.configs.run import RunConfig
from jaxlm.model.transformer import Transformer
from jaxlm.optim import make_optimizer, schedule
from jaxlm.sharding import BATCH_AXES

BATCH_SPEC = PartitionSpec(BATCH_AXES)


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_streak: jax.Array  # consecutive skipped (non-finite) steps up to now
    nonfinite_total: jax.Array  # skipped steps over the whole run


def _step_zero(params: Any, tx: optax.GradientTransformation, state_rng: jax.Array) -> TrainState:
    # Optimizer state built from boxed params inherits their logical axis names.
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(state_rng),
        nonfinite_streak=zero,
        nonfinite_total=zero,
    )


def _init_fn(config: RunConfig, tx: optax.GradientTransformation) -> Callable[[jax.Array], Any]:
    def init(rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, 1), jnp.int32)
        params_rng, state_rng = jax.random.split(jax.random.wrap_key_data(rng))
        params = Transformer(config.model).init(params_rng, tokens)["params"]
        return _step_zero(params, tx, state_rng)

    return init


def state_shardings(config: RunConfig, mesh: Mesh) -> Any:
    """`NamedSharding`s for the whole `TrainState` (optimizer moments follow their parameters)."""
    tx = make_optimizer(config.optim, config.train.steps)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract = jax.eval_shape(_init_fn(config, tx), rng)
    return sharding.logical_to_sharding(abstract, mesh, sharding.get_rules(config.mesh.rules))


def abstract_train_state(config: RunConfig, mesh: Mesh) -> Any:
    """The `TrainState` as `ShapeDtypeStruct`s carrying their shardings (for AOT and restore)."""
    tx = make_optimizer(config.optim, config.train.steps)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(_init_fn(config, tx)(r)), rng)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes,
        state_shardings(config, mesh),
    )


def abstract_batch(config: RunConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `config.data` as `ShapeDtypeStruct`s with the batch sharding."""
    b, t = config.data.batch_size, config.data.seq_len
    return {
        k: jax.ShapeDtypeStruct(
            (b,) if k == "target_bytes" else (b, t), bool if k == "mask" else jnp.int32, sharding=s
        )
        for k, s in batch_shardings(mesh).items()
    }


def init_train_state(config: RunConfig, mesh: Mesh, rng: jax.Array | int = 0) -> TrainState:
    """A fresh `TrainState`, each array created in its sharding (never whole on one device)."""
    tx = make_optimizer(config.optim, config.train.steps)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    shardings = state_shardings(config, mesh)
    init = _init_fn(config, tx)
    with sharding.use_mesh(mesh, config.mesh.rules):
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
            jax.random.key_data(key)
        )


def train_state_from_params(config: RunConfig, mesh: Mesh, params: Any) -> TrainState:
    """A step-0 `TrainState` around given `params` (e.g. imported weights; they are donated):
    optimizer state and RNG exactly as `init_train_state(config, mesh, config.seed)` makes them,
    every array in its sharding."""
    tx = make_optimizer(config.optim, config.train.steps)
    _, state_rng = jax.random.split(jax.random.key(config.seed))
    with sharding.use_mesh(mesh, config.mesh.rules):
        build = jax.jit(
            lambda p: _step_zero(p, tx, state_rng),
            out_shardings=state_shardings(config, mesh),
            donate_argnums=0,
        )
        return build(params)


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every element, in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    # Row j of microbatch i is row j * k + i: every device's rows feed every microbatch.
    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


MOE_METRICS = (
    "moe_lb_loss",
    "moe_z_loss",
    "moe_dropped_fraction",
    "moe_router_entropy",
    "moe_load_max",
    "moe_load_min",
)


def moe_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-step MoE statistics over all MoE layers: the (weighted) aux losses summed, the dropped
    fraction and router entropy averaged, and the most / least loaded expert's share of the
    assignments times E (1 = perfectly balanced)."""
    if "moe_expert_load" not in aux:
        return {}
    load_E = jnp.mean(aux["moe_expert_load"], axis=0)
    e = load_E.shape[-1]
    return {
        "moe_lb_loss": jnp.sum(aux["moe_lb_loss"]),
        "moe_z_loss": jnp.sum(aux["moe_z_loss"]),
        "moe_dropped_fraction": jnp.mean(aux["moe_dropped_fraction"]),
        "moe_router_entropy": jnp.mean(aux["moe_router_entropy"]),
        "moe_load_max": jnp.max(load_E) * e,
        "moe_load_min": jnp.min(load_E) * e,
        "moe_expert_load": load_E,  # [E]: share of the assignments per expert (sums to 1)
    }


def _loss_terms(
    config: RunConfig, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
) -> dict[str, Any]:
    rngs = {"router": rng} if rng is not None and config.model.moe.router_jitter > 0 else {}
    logits, _, aux = Transformer(config.model).apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], rngs=rngs
    )
    sums = losses.cross_entropy_sums(logits, batch["targets"], batch["mask"])
    return {**sums, "aux": losses.aux_loss(aux), **moe_metrics(aux)}


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, config: RunConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` (split into `config.train.microbatches` with `lax.scan`).

    The loss is the mean next-token cross-entropy over all masked-in tokens of the whole batch
    (so k microbatches of b rows give exactly the gradient of one batch of k*b rows), plus the
    z-loss and the model's auxiliary losses.

    If the loss, the gradients or the updated parameters are not all finite, the update is
    skipped: parameters and optimizer state stay as they were, the step counter still advances
    (it counts batches consumed, which the data order and checkpoints follow), and the
    `nonfinite_streak` / `nonfinite_total` counters go up. The streak resets on a good step.
    """
    tx = make_optimizer(config.optim, config.train.steps)
    k = config.train.microbatches
    total = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
    model_batch = {key: v for key, v in batch.items() if key != "target_bytes"}

    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(
        params: Any, mb: dict[str, jax.Array], i: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        terms = _loss_terms(config, params, mb, jax.random.fold_in(rng, i))
        loss = (terms["nll"] + config.train.z_loss * terms["z"]) / total + terms["aux"] / k
        return loss, terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (_, terms), grads = grad_fn(state.params, model_batch, 0)
    else:

        def accumulate(carry: Any, xs: Any) -> tuple[Any, None]:
            grads, sums = carry
            (_, terms), g = grad_fn(state.params, *xs)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, terms)), None

        zero_grads = jax.tree.map(jnp.zeros_like, state.params)
        mbs = _microbatches(model_batch, k)
        # The accumulator has the structure of one microbatch's terms (incl. MoE statistics).
        one = jax.eval_shape(
            lambda mb: _loss_terms(config, state.params, mb, rng), jax.tree.map(lambda x: x[0], mbs)
        )
        zero_terms = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), one)
        (grads, terms), _ = jax.lax.scan(accumulate, (zero_grads, zero_terms), (mbs, jnp.arange(k)))
        terms = {n: v / k if n == "aux" or n.startswith("moe_") else v for n, v in terms.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = terms["nll"] / total
    grad_norm, param_norm = global_norm(grads), global_norm(params)
    finite = (
        jnp.isfinite(loss)
        & jnp.isfinite(terms["z"])
        & jnp.isfinite(terms["aux"])
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(param_norm)
    )
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state),
        (state.params, state.opt_state),
    )
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    nonfinite_total = state.nonfinite_total + (~finite).astype(jnp.int32)
    metrics = {
        "loss": loss,
        "z_loss": terms["z"] / total,
        "aux_loss": terms["aux"],
        "grad_norm": grad_norm,
        "param_norm": jnp.where(finite, param_norm, global_norm(state.params)),
        "skipped": (~finite).astype(jnp.float32),
        "nonfinite_streak": streak.astype(jnp.float32),
        "nonfinite_total": nonfinite_total.astype(jnp.float32),
        "lr": schedule(config.optim, config.train.steps)(state.step),
        "tokens": terms["count"],
        **{n: terms[n] for n in MOE_METRICS if n in terms},
        **{
            f"moe_expert_load_{i}": terms["moe_expert_load"][i]
            for i in range(config.model.moe.num_experts if "moe_expert_load" in terms else 0)
        },
        "bits_per_byte": terms["nll"]
        / math.log(2)
        / jnp.maximum(jnp.sum(batch["target_bytes"]), 1),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite_streak=streak,
        nonfinite_total=nonfinite_total,
    )
    return new_state, metrics


def eval_step(
    params: Any, batch: dict[str, jax.Array], *, config: RunConfig
) -> dict[str, jax.Array]:
    """Sums for evaluation: cross-entropy, token count and target bytes (aggregate over batches)."""
    model_batch = {key: v for key, v in batch.items() if key != "target_bytes"}
    terms = _loss_terms(config, params, model_batch)
    return {"nll": terms["nll"], "count": terms["count"], "bytes": jnp.sum(batch["target_bytes"])}


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    s = NamedSharding(mesh, BATCH_SPEC)
    return {k: s for k in ("tokens", "targets", "mask", "segment_ids", "positions", "target_bytes")}


def make_train_step(config: RunConfig, mesh: Mesh) -> Callable[..., Any]:
    """`train_step` jitted once with state/batch shardings and the old state donated."""
    state_sh = state_shardings(config, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        lambda state, batch: train_step(state, batch, config=config),
        in_shardings=(state_sh, batch_shardings(mesh)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )

    def step(state: TrainState, batch: dict[str, jax.Array]) -> Any:
        with sharding.use_mesh(mesh, config.mesh.rules):
            return jitted(state, batch)

    step.jitted = jitted  # for ahead-of-time lowering
    return step


def make_eval_step(config: RunConfig, mesh: Mesh) -> Callable[..., Any]:
    params_sh = state_shardings(config, mesh).params
    jitted = jax.jit(
        lambda params, batch: eval_step(params, batch, config=config),
        in_shardings=(params_sh, batch_shardings(mesh)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )

    def step(params: Any, batch: dict[str, jax.Array]) -> Any:
        with sharding.use_mesh(mesh, config.mesh.rules):
            return jitted(params, batch)

    return step
