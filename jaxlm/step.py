"""`TrainState` and the pure steps: `train_step` (gradient accumulation, frozen parameters,
dynamic loss scaling, non-finite steps skipped) and `eval_step`. `jaxlm.run` jits them with their
shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlm import losses, precision
from jaxlm.configs.run import RunConfig
from jaxlm.model import mup
from jaxlm.optim import make_optimizer, schedule
from jaxlm.tasks import Task, get_task, merge, partition


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    `params` holds every parameter; `opt_state` covers only those the task trains.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_streak: jax.Array  # consecutive skipped (non-finite) steps up to now
    nonfinite_total: jax.Array  # skipped steps over the whole run
    # The dynamic loss scaler's state (`jaxlm.precision`), or None when the run does not scale.
    loss_scale: Any = None


def step_zero(
    params: Any,
    tx: optax.GradientTransformation,
    task: Task,
    state_rng: jax.Array,
    loss_scale: precision.LossScaleState | None = None,
) -> TrainState:
    """The step-0 state around `params` (boxed params give the optimizer state their logical
    axis names); `loss_scale`: `precision.init_loss_scale(config)`."""
    zero = jnp.zeros((), jnp.int32)
    trainable, _ = partition(params, task.trainable)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(state_rng),
        nonfinite_streak=zero,
        nonfinite_total=zero,
        loss_scale=loss_scale,
    )


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every element, in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _grad_norm(grads: Any) -> jax.Array:
    """`global_norm(grads)`, as the same expression as `optax.clip_by_global_norm`'s when every
    gradient is float32 (so XLA computes the one norm once)."""
    if all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads)):
        return optax.tree.norm(grads)
    return global_norm(grads)


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    # Row j of microbatch i is row j * k + i: every device's rows feed every microbatch.
    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    extra: dict[str, Any] | None = None,
    *,
    config: RunConfig,
    task: Task | None = None,
    tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch` (split into `config.train.microbatches` with `lax.scan`),
    or `task.updates_per_step` of them in a row on the same batch (PPO's epochs on a rollout).

    The objective is the task's summed loss over the whole batch divided by its normalizer
    (for LM: the mean next-token cross-entropy over all masked-in tokens plus the z-loss), so k
    microbatches of b rows give exactly the gradient of one batch of k*b rows, plus the model's
    auxiliary losses. Only the parameters the task trains get gradients and updates; the others
    are returned bitwise unchanged.

    If the loss or the gradients are not all finite (or their global norm overflows), the
    update is skipped: parameters and optimizer state stay as they were, the step counter still
    advances (it counts batches consumed, which the data order and checkpoints follow), and the
    `nonfinite_streak` / `nonfinite_total` counters go up. The streak resets on a good step.
    With several updates per step, each is skipped on its own and the step counts as skipped
    when any was; the step's loss terms are the mean over its updates.

    With dynamic loss scaling (`state.loss_scale` set; `jaxlm.precision`) the backward pass runs
    on the scaled objective and the gradients are unscaled before the norm, clipping and the
    update. Non-finite gradients of a finite loss are an overflow: skipped as above, but the
    scale halves and the streak neither grows nor resets (at scale 1 it is a non-finite step).

    `extra`: frozen parameters besides the run's (`Task.frozen_inputs`, e.g. a teacher), merged
    into what the loss sees and left out of the new state.
    """
    task = task or get_task(config)
    updates = task.updates_per_step
    tx = tx or make_optimizer(
        config.optim, config.train.steps, updates, mup.lr_multipliers(config.model)
    )
    trainable, frozen = partition(state.params, task.trainable)
    frozen_in = frozen if extra is None else {**frozen, **extra}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def one(carry: Any, u: jax.Array) -> tuple[Any, Any]:
        trainable, opt_state, scaler = carry
        key = rng if updates == 1 else jax.random.fold_in(rng, u)  # one: the streams as before
        scale = None if scaler is None else scaler["scale"]
        trainable, opt_state, terms, grad_norm, param_norm, finite, loss_finite = _update(
            trainable, opt_state, frozen_in, batch, key, config, task, tx, scale
        )
        # Non-finite gradients of a finite loss under loss scaling: an overflow, which a lower
        # scale cures (unless it is 1 already, when it counts as a non-finite step).
        overflow = jnp.zeros((), bool)
        if scaler is not None:
            overflow = ~finite & loss_finite
            scaler = precision.next_loss_scale(scaler, overflow, config.train.loss_scale_period)
            overflow = overflow & (scale > 1)
        return (trainable, opt_state, scaler), (terms, grad_norm, param_norm, finite, overflow)

    carry = (trainable, state.opt_state, state.loss_scale)
    if updates == 1:
        carry, (terms, grad_norm, param_norm, finite, overflow) = one(
            carry, jnp.zeros((), jnp.int32)
        )
    else:
        carry, (terms, grad_norm, param_norm, finite, overflow) = jax.lax.scan(
            one, carry, jnp.arange(updates)
        )
        terms = jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)
        grad_norm, param_norm = grad_norm[-1], param_norm[-1]
        finite, overflow = jnp.all(finite), jnp.any(overflow) & ~jnp.any(~finite & ~overflow)
    trainable, opt_state, scaler = carry
    total = task.normalizer(batch)
    # A skipped step that a lower loss scale cures leaves the streak as it is.
    bad = ~finite & ~overflow
    streak = jnp.where(finite, 0, state.nonfinite_streak + bad.astype(jnp.int32))
    nonfinite_total = state.nonfinite_total + bad.astype(jnp.int32)
    scaler_metrics = {}
    if scaler is not None:
        scaler_metrics = {
            "loss_scale": scaler["scale"],
            "overflow": overflow.astype(jnp.float32),
            "overflows": scaler["overflows"].astype(jnp.float32),
        }
    metrics = {
        **task.metrics(terms, batch, total),
        "aux_loss": terms["aux"],
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "skipped": (~finite).astype(jnp.float32),
        "nonfinite_streak": streak.astype(jnp.float32),
        "nonfinite_total": nonfinite_total.astype(jnp.float32),
        "lr": schedule(config.optim, config.train.steps)(state.step),
        **scaler_metrics,
        **{n: terms[n] for n in losses.MOE_METRICS if n in terms},
        **{
            f"moe_expert_load_{i}": terms["moe_expert_load"][i]
            for i in range(config.model.moe.num_experts if "moe_expert_load" in terms else 0)
        },
    }
    new_state = state.replace(
        step=state.step + 1,
        params=merge(trainable, frozen),
        opt_state=opt_state,
        nonfinite_streak=streak,
        nonfinite_total=nonfinite_total,
        loss_scale=scaler,
    )
    return new_state, metrics


def _update(
    trainable: Any,
    opt_state: Any,
    frozen: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    config: RunConfig,
    task: Task,
    tx: optax.GradientTransformation,
    scale: jax.Array | None = None,
) -> tuple[Any, Any, dict[str, jax.Array], jax.Array, jax.Array, jax.Array, jax.Array]:
    """One update of the trained parameters on `batch`: (trainable, opt_state, summed terms,
    grad norm, param norm, finite, loss finite); a non-finite update leaves both as they were.
    `scale`: the loss scale the backward pass runs at (None: 1, and no unscaling pass)."""
    k = config.train.microbatches
    total = task.normalizer(batch)

    def loss_fn(
        params: Any, mb: dict[str, jax.Array], i: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        terms = task.loss_terms(merge(params, frozen), mb, jax.random.fold_in(rng, i))
        objective = terms["loss"] / total + terms["aux"] / k
        return (objective if scale is None else objective * scale), terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (_, terms), grads = grad_fn(trainable, batch, 0)
    else:

        def accumulate(carry: Any, xs: Any) -> tuple[Any, None]:
            grads, sums = carry
            (_, terms), g = grad_fn(trainable, *xs)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, terms)), None

        zero_grads = jax.tree.map(jnp.zeros_like, trainable)
        mbs = _microbatches(batch, k)
        # The accumulator has the structure of one microbatch's terms (incl. MoE statistics).
        one = jax.eval_shape(
            lambda mb: task.loss_terms(merge(trainable, frozen), mb, rng),
            jax.tree.map(lambda x: x[0], mbs),
        )
        zero_terms = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), one)
        (grads, terms), _ = jax.lax.scan(accumulate, (zero_grads, zero_terms), (mbs, jnp.arange(k)))
        terms = {n: v / k if n == "aux" or n.startswith("moe_") else v for n, v in terms.items()}
    # Finite loss and gradients give a finite update (every optimizer here divides by at least
    # eps), so the decision needs no pass over the updated parameters and the select below fuses
    # into the optimizer's own elementwise pass. The norm is optax's own expression for float32
    # gradients, so XLA computes it once for clipping and this metric.
    if scale is not None:
        grads = precision.unscale(grads, scale)
    grad_norm = _grad_norm(grads)
    loss_finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(terms["aux"])
    finite = loss_finite & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_trainable, new_opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (new_trainable, new_opt_state),
        (trainable, opt_state),
    )
    param_norm = global_norm(new_trainable)
    return new_trainable, new_opt_state, terms, grad_norm, param_norm, finite, loss_finite


def eval_step(
    params: Any, batch: dict[str, jax.Array], *, config: RunConfig, task: Task | None = None
) -> dict[str, jax.Array]:
    """The task's eval sums over one batch (added up over batches, then `task.eval_metrics`)."""
    return (task or get_task(config)).eval_sums(params, batch)
