"""The one run setup: from a `RunConfig` to the mesh, task, optimizer, abstract state, state and
batch shardings, all checked before anything is compiled or written.

`RunPlan` is built once per run and shared by the training loop, Hugging Face import, sweeps,
evaluation and the CLI; its methods give the jitted, sharded pieces (init, train and eval steps)
that the loop drives. `load_for_eval` restores only what sampling and evaluation need.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import checkpoint, sharding, storage
from jaxlm.configs.overrides import from_dict, to_dict
from jaxlm.configs.run import RunConfig
from jaxlm.data.pipeline import StreamIterator, check_batch_size
from jaxlm.data.tokenizer import Tokenizer, make_tokenizer
from jaxlm.model import context, fused_attention, mup, pipeline
from jaxlm.model.lora import is_adapter
from jaxlm.model.transformer import Transformer, abstract_params, param_shardings
from jaxlm.optim import make_optimizer
from jaxlm.precision import init_loss_scale
from jaxlm.sharding import BATCH_AXES
from jaxlm.step import TrainState, eval_step, step_zero, train_step
from jaxlm.tasks import Task, get_task, merge, param_names, partition

BATCH_SPEC = PartitionSpec(BATCH_AXES)


def check_run(config: RunConfig, tokenizer: Tokenizer, data: bool = True) -> None:
    """Refuse configs that cannot work, before anything is compiled or written (`data=False`:
    all but the task's own checks, which read the dataset)."""
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    room = config.model.max_seq_len - config.model.prompt_tokens
    if config.data.seq_len > room:
        extra = f" less model.prompt_tokens={config.model.prompt_tokens}" * bool(
            config.model.prompt_tokens
        )
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}{extra}"
        )
    per_step = config.data.batch_size // jax.process_count()
    if per_step % config.train.microbatches:
        raise ValueError(
            f"the per-process batch ({per_step}) is not divisible by "
            f"train.microbatches={config.train.microbatches}"
        )
    if config.model.parametrization == "mup" and config.optim.name not in mup.MUP_OPTIMIZERS:
        raise ValueError(
            f"model.parametrization='mup' defines learning-rate multipliers for "
            f"{list(mup.MUP_OPTIMIZERS)} (updates that do not scale with the gradient), not "
            f"optim.name={config.optim.name!r} (Adafactor scales its updates by each weight's "
            "size); use adamw or lion, or parametrization='sp'"
        )
    if data:
        get_task(config).check(tokenizer)


class RunPlan:
    """Everything about a run that follows from its config, derived once.

    `tokenizer` (default: the one `config.data.tokenizer` names) is checked against the config;
    `mesh` defaults to `config.mesh` over all devices. `check_data=False` leaves out the task's
    checks of the dataset (for a plan that never trains, e.g. writing an imported model's run).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        mesh: Mesh | None = None,
        tokenizer: Tokenizer | None = None,
        check_data: bool = True,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer or make_tokenizer(config.data.tokenizer)
        check_run(config, self.tokenizer, data=check_data)
        self.mesh = mesh or sharding.make_mesh(config.mesh)
        # An attention kernel the mesh's backend lacks, or tiles that do not divide a sequence.
        fused_attention.describe(
            config.model, config.data.seq_len, on=self.mesh.devices.flat[0].platform
        )
        fused_attention.check_blocks(config.model, config.data.seq_len)
        context.check(config.model, config.data.seq_len, int(self.mesh.shape["context"]))
        pipeline.check(
            config.model,
            dict(self.mesh.shape),
            config.data.batch_size // config.train.microbatches,
        )
        check_batch_size(config.data.batch_size, self.mesh, jax.process_count())
        self.rules = sharding.get_rules(config.mesh.rules)
        self.task: Task = get_task(config)
        self.optimizer: optax.GradientTransformation = make_optimizer(
            config.optim,
            config.train.steps,
            self.task.updates_per_step,
            mup.lr_multipliers(config.model),
        )
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        boxed = jax.eval_shape(self._init_boxed, rng)
        self.state_shardings: Any = sharding.logical_to_sharding(boxed, self.mesh, self.rules)
        self.abstract_state: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.meta.unbox(boxed),
            self.state_shardings,
        )
        self.batch_shardings: dict[str, NamedSharding] = {
            k: NamedSharding(self.mesh, BATCH_SPEC) for k in self.task.batch_spec()
        }

    def _init_boxed(self, rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, 1), jnp.int32)
        params_rng, state_rng = jax.random.split(jax.random.wrap_key_data(rng))
        params = Transformer(self.config.model).init(params_rng, tokens)["params"]
        return step_zero(params, self.optimizer, self.task, state_rng, init_loss_scale(self.config))

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A global batch as `ShapeDtypeStruct`s with the batch sharding (for AOT compiles)."""
        return {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_shardings[k])
            for k, (shape, dtype) in self.task.batch_spec().items()
        }

    def trainable_names(self) -> list[str]:
        """The '/'-joined paths of the parameters this run trains."""
        return [n for n in param_names(self.abstract_state.params) if self.task.trainable(n)]

    def init_state(self, rng: jax.Array | int | None = None) -> TrainState:
        """A fresh `TrainState`, each array created in its sharding (never whole on one device);
        `rng` defaults to `config.seed`."""
        rng = self.config.seed if rng is None else rng
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        with sharding.use_mesh(self.mesh, self.rules):
            init = jax.jit(
                lambda r: nn.meta.unbox(self._init_boxed(r)), out_shardings=self.state_shardings
            )
            return init(jax.random.key_data(key))

    def init_params(self, keep: Callable[[str], bool] | None = None) -> Any:
        """The parameters `init_state()` starts from (those whose path `keep` accepts; XLA
        computes only those), created in their shardings."""
        keep = keep or (lambda name: True)
        shardings = partition(self.state_shardings.params, keep)[0]

        def init(rng: jax.Array) -> Any:
            return partition(nn.meta.unbox(self._init_boxed(rng)).params, keep)[0]

        key = jax.random.key_data(jax.random.key(self.config.seed))
        with sharding.use_mesh(self.mesh, self.rules):
            return jax.jit(init, out_shardings=shardings)(key)

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 `TrainState` around given `params` (e.g. imported or another run's weights;
        they are donated): optimizer state and RNG exactly as `init_state()` makes them."""
        _, state_rng = jax.random.split(jax.random.key(self.config.seed))
        with sharding.use_mesh(self.mesh, self.rules):
            build = jax.jit(
                lambda p: step_zero(
                    p, self.optimizer, self.task, state_rng, init_loss_scale(self.config)
                ),
                out_shardings=self.state_shardings,
                donate_argnums=0,
            )
            return build(params)

    def _in_mesh(self, jitted: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with sharding.use_mesh(self.mesh, self.rules):
                return jitted(*args)

        call.jitted = jitted  # for ahead-of-time lowering
        return call

    @functools.cached_property
    def frozen_inputs(self) -> Any:
        """The task's frozen parameters besides the run's (`Task.frozen_inputs`), or None."""
        return self.task.frozen_inputs(self)

    @functools.cached_property
    def train_step(self) -> Callable[[TrainState, dict[str, jax.Array]], Any]:
        """`train_step` jitted once with the state and batch shardings, the old state donated
        (and the task's frozen inputs passed along as an argument)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        step = functools.partial(train_step, config=self.config, task=self.task, tx=self.optimizer)
        extra = self.frozen_inputs
        if extra is None:
            return self._in_mesh(
                jax.jit(
                    step,
                    in_shardings=(self.state_shardings, self.batch_shardings),
                    out_shardings=(self.state_shardings, replicated),
                    donate_argnums=0,
                )
            )
        jitted = jax.jit(
            step,
            in_shardings=(
                self.state_shardings,
                self.batch_shardings,
                jax.tree.map(lambda x: x.sharding, extra),
            ),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        return self._in_mesh(lambda state, batch: jitted(state, batch, extra))

    @functools.cached_property
    def rollouts(self) -> Any:
        """The task's rollouts (`Task.make_rollouts`), or None for tasks that read fixed data."""
        return self.task.make_rollouts(self)

    @functools.cached_property
    def eval_step(self) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
        """`eval_step` jitted with the parameter and batch shardings; returns replicated sums."""
        step = functools.partial(eval_step, config=self.config, task=self.task)
        return self._in_mesh(
            jax.jit(
                step,
                in_shardings=(self.state_shardings.params, self.batch_shardings),
                out_shardings=NamedSharding(self.mesh, PartitionSpec()),
            )
        )

    def make_iterator(
        self,
        *,
        split: str | None = None,
        num_epochs: int | None = None,
        num_streams: int | None = None,
    ) -> StreamIterator:
        """This process's batches of the task's data (train split, endless, by default)."""
        return self.task.make_iterator(
            self.tokenizer,
            split=split,
            seed=self.config.seed,
            mesh=self.mesh,
            num_epochs=num_epochs,
            num_streams=num_streams,
        )

    def checkpoint_bytes(self) -> int:
        """One checkpoint's size (the whole train state)."""
        return checkpoint.state_bytes(self.abstract_state)


# --- starting from another run's parameters -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A checkpoint another run starts from: its workdir, step and config."""

    workdir: storage.AnyPath
    step: int
    config: RunConfig


def _shapes(params: Any) -> dict[str, tuple[int, ...]]:
    return {
        n: tuple(x.shape) for n, x in zip(param_names(params), jax.tree.leaves(params), strict=True)
    }


def _abstract_params(config: RunConfig) -> Any:
    return nn.meta.unbox(abstract_params(config.model))


def _fresh(name: str) -> bool:
    """Parameters a run may add to its source's: adapters, a score head and a value head."""
    return is_adapter(name) or name.startswith(("score/", "value/"))


def check_init_source(
    plan: RunPlan, workdir: str | Path, step: int | None = None, what: str = "train.init_from"
) -> InitSource:
    """The checkpoint of `workdir` (at `step`, default the newest) that `plan`'s run can start
    from (or compare with: `what` names the setting in errors); a clear error if `workdir` is
    not a run, has no such checkpoint, holds a model of another architecture or used another
    tokenizer."""
    workdir = storage.as_path(workdir)
    flag = f"{what}={str(workdir)!r}"
    steps = checkpoint.complete_steps(workdir)
    if not (workdir / checkpoint.CONFIG_FILE).is_file() and not steps:
        raise FileNotFoundError(
            f"{flag}: not a jaxlm run directory (no {checkpoint.CONFIG_FILE} or checkpoints); "
            "give a run's --workdir or a model imported with `jaxlm convert --from-hf`"
        )
    if not steps:
        raise FileNotFoundError(f"{flag}: the run holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"train.init_from_step={step}: no such checkpoint; steps: {steps}")
    source = checkpoint.saved_config(workdir, step)
    theirs = _shapes(_abstract_params(source))
    ours = _shapes(plan.abstract_state.params)
    # New adapters (LoRA on a plain model) and a new score head (a reward model from a language
    # model, whose unembedding is then left behind) start fresh; the rest must come from there.
    base = {n: s for n, s in ours.items() if not (_fresh(n) and n not in theirs)}
    if plan.config.model.head == "score":
        theirs = {n: s for n, s in theirs.items() if not n.startswith("unembed/")}
    if theirs != base:
        a, b = to_dict(source.model), to_dict(plan.config.model)
        fields = [
            f"model.{k}: {a[k]!r} there, {b.get(k)!r} here"
            for k in a
            if a[k] != b.get(k) and k not in ("lora", "head", "prompt_tokens")
        ]
        first = next(
            f"{n}: {theirs.get(n)} there, {base.get(n)} here"
            for n in sorted(set(theirs) | set(base))
            if theirs.get(n) != base.get(n)
        )
        raise ValueError(
            f"{flag} holds a model of another architecture ({'; '.join(fields) or first}; first "
            f"parameter that differs: {first}); "
            + (
                "use that run's model config"
                if what == "train.init_from"
                else "a reference must have the policy's architecture"
            )
        )
    saved = workdir / checkpoint.CHECKPOINT_DIR / str(step) / "tokenizer" / "metadata"
    if saved.is_file() and json.loads(saved.read_text()) != checkpoint.tokenizer_files(
        plan.tokenizer
    ):
        raise ValueError(
            f"{flag} was trained with another tokenizer than data.tokenizer="
            f"{plan.config.data.tokenizer!r}; use its tokenizer "
            f"(--set data.tokenizer={workdir / checkpoint.TOKENIZER_DIR})"
        )
    return InitSource(workdir, step, source)


def state_from_source(plan: RunPlan, source: InitSource) -> TrainState:
    """A step-0 state of `plan`'s run holding `source`'s parameters (cast to this run's dtypes,
    placed on its shardings), fresh adapters where the source has none, and a fresh optimizer."""
    target = plan.abstract_state.params
    theirs = set(_shapes(_abstract_params(source.config)))
    ckpt = checkpoint.Checkpointer(source.workdir, read_only=True)
    try:
        wanted = partition(target, theirs.__contains__)[0]
        partial = set(param_names(wanted)) != theirs  # a score head leaves the unembedding
        params = ckpt.restore_params(source.step, wanted, partial=partial)
    finally:
        ckpt.close()
    new = [n for n in _shapes(target) if n not in theirs]
    if new:
        # Only the new parameters' initialisation is computed (XLA drops the rest of init).
        params = merge(params, plan.init_params(lambda n: n not in theirs))
    return plan.state_from_params(params)


# --- restoring for sampling and evaluation ---------------------------------------------------


def load_for_eval(
    workdir: str | Path, step: int | None = None, log: Callable[[str], None] | None = None
) -> tuple[RunConfig, Mesh, Any, Tokenizer]:
    """The config, a mesh over this machine's devices, the parameters (only: no optimizer state
    is read or built) and the tokenizer of the checkpoint at `step`.

    The default, `step=None`, is the newest checkpoint that restores: a damaged newer one is
    skipped with a message through `log` (default: stderr), and left in place (this reads only).
    """
    return load_step_for_eval(workdir, step, log)[1:]  # type: ignore[return-value]


def load_step_for_eval(
    workdir: str | Path, step: int | None = None, log: Callable[[str], None] | None = None
) -> tuple[int, RunConfig, Mesh, Any, Tokenizer]:
    """`load_for_eval` with the step it restored first (the newest that restores by default)."""
    log = log or _log_stderr
    if not storage.as_path(workdir).is_dir():
        what = "is a file" if storage.as_path(workdir).exists() else "does not exist"
        raise FileNotFoundError(f"--workdir {str(workdir)!r} {what}: give a jaxlm run directory")
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        if step is None:
            found, loaded = ckpt.restore_latest(lambda s: _load_step(ckpt, s), log)
            return (found, *loaded)  # type: ignore[return-value]
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {ckpt.directory}; steps: {steps}")
        try:
            return (step, *_load_step(ckpt, step))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            others = [s for s in steps if s != step]
            raise checkpoint.CheckpointError(
                f"the checkpoint at step {step} in {ckpt.directory} cannot be restored "
                f"({checkpoint.brief(e)})" + (f"; other steps: {others} (--step)" if others else "")
            ) from e
    finally:
        ckpt.close()


def _log_stderr(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _load_step(ckpt: checkpoint.Checkpointer, step: int) -> tuple[RunConfig, Mesh, Any, Tokenizer]:
    config = from_dict(RunConfig, ckpt.restore_json(step, "config"))
    with tempfile.TemporaryDirectory() as tmp:
        files = ckpt.restore_json(step, "tokenizer")
        tokenizer = make_tokenizer(str(checkpoint.write_tokenizer_files(files, tmp)))
    # Use whatever devices this machine has: fsdp over all of them.
    flat = {n: 1 for n in ("data", "expert", "context", "tensor")}
    flat |= {f"dcn_{n}": 1 for n in ("data", "fsdp", "expert", "context", "tensor")}
    flat["fsdp"] = -1
    mesh = sharding.make_mesh(dataclasses.replace(config.mesh, **flat))
    shardings = param_shardings(config.model, mesh, config.mesh.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _abstract_params(config),
        shardings,
    )
    return config, mesh, ckpt.restore_params(step, abstract), tokenizer


# --- the same pieces as functions of (config, mesh) -------------------------------------------


def init_train_state(config: RunConfig, mesh: Mesh, rng: jax.Array | int = 0) -> TrainState:
    """A fresh `TrainState` of `config` on `mesh` (see `RunPlan.init_state`)."""
    return _plan(config, mesh).init_state(rng)


def train_state_from_params(config: RunConfig, mesh: Mesh, params: Any) -> TrainState:
    """A step-0 `TrainState` around `params` (see `RunPlan.state_from_params`)."""
    return _plan(config, mesh).state_from_params(params)


def abstract_train_state(config: RunConfig, mesh: Mesh) -> TrainState:
    """The `TrainState` as `ShapeDtypeStruct`s carrying their shardings (for AOT and restore)."""
    return _plan(config, mesh).abstract_state


def abstract_batch(config: RunConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `config`'s task as sharded `ShapeDtypeStruct`s."""
    return _plan(config, mesh).abstract_batch()


def make_train_step(config: RunConfig, mesh: Mesh) -> Callable[..., Any]:
    """`train_step` jitted once with state/batch shardings and the old state donated."""
    return _plan(config, mesh).train_step


def make_eval_step(config: RunConfig, mesh: Mesh) -> Callable[..., Any]:
    """`eval_step` jitted with parameter and batch shardings."""
    return _plan(config, mesh).eval_step


def _plan(config: RunConfig, mesh: Mesh) -> RunPlan:
    # The tokenizer only matters for the checks; a byte-sized stand-in keeps these helpers cheap.
    from jaxlm.data.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer() if config.data.tokenizer == "byte" else None
    return RunPlan(config, mesh=mesh, tokenizer=tokenizer)
