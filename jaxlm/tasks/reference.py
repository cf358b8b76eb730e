"""The reference policy of DPO, PPO and GRPO as a frozen copy of a model (full fine-tuning).

With LoRA or prompt tuning the reference is the model without its adapters: the frozen base
weights are already in the run's parameters. A full fine-tune changes those, so its reference is
a frozen copy of the model it started from: `train.init_from` (at `train.init_from_step`), or
the newest checkpoint of `task.reference` (a run's workdir; with adapters too, in place of the
model without them). A reference holding adapters itself is refused (they would be lost). The
copy is loaded once, in the policy's shardings, with no gradient or optimizer state (one more
set of weights in memory).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import checkpoint, losses
from jaxlm.configs.model import LoRAConfig, ModelConfig
from jaxlm.model.transformer import Transformer, param_shardings
from jaxlm.sharding import BATCH_AXES, use_mesh

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig
    from jaxlm.run import RunPlan


def has_adapters(model: ModelConfig) -> bool:
    return bool(model.lora.rank or model.prompt_tokens)


def base_model(model: ModelConfig) -> ModelConfig:
    """The model without adapters and value head: what a reference (or the base) computes."""
    return dataclasses.replace(model, lora=LoRAConfig(), prompt_tokens=0, value_head=False)


def check_reference_given(config: RunConfig) -> None:
    """A full fine-tune (no adapters) names where its frozen reference comes from."""
    if has_adapters(config.model) or config.task.reference or config.train.init_from:
        return
    raise ValueError(
        f"task.kind={config.task.kind} compares the policy with a reference: with LoRA "
        "(--set model.lora.rank=8) or prompt tuning it is the model without its adapters; a full "
        "fine-tune needs a frozen copy of the model it starts from: --init-from RUN (the "
        "reference is that checkpoint) or task.reference=RUN"
    )


def reference_logits(model: ModelConfig, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Logits of the base model (`base_model(model)`) with `params`, no gradient."""
    logits, _, _ = Transformer(base_model(model)).apply(
        {"params": jax.lax.stop_gradient(params)},
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
    )
    return logits


def load_reference(plan: RunPlan) -> Any:
    """The frozen reference parameters of `plan`'s run: of `task.reference` when it is set,
    else of a full fine-tune's `train.init_from`; None for a run with adapters and no
    `task.reference` (its reference is the model without them).

    The source is checked like `--init-from` (architecture, tokenizer) before anything loads."""
    from jaxlm.run import _abstract_params, _shapes, check_init_source

    config = plan.config
    if has_adapters(config.model) and not config.task.reference:
        return None
    check_reference_given(config)
    where = config.task.reference or config.train.init_from
    step = None if config.task.reference else config.train.init_from_step
    what = "task.reference" if config.task.reference else "train.init_from"
    source = check_init_source(plan, where, step, what)
    if has_adapters(source.config.model):
        raise ValueError(
            f"{what}={str(where)!r} holds adapters (LoRA or prompt tuning), which a reference "
            "would silently lose; use a plain run: export it merged (jaxlm convert --to-hf "
            "--lora merged) and import that (jaxlm convert --from-hf)"
        )
    model = base_model(config.model)
    shardings = param_shardings(model, plan.mesh, plan.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _abstract_params(dataclasses.replace(config, model=model)),
        shardings,
    )
    theirs = set(_shapes(_abstract_params(source.config)))
    ckpt = checkpoint.Checkpointer(source.workdir, read_only=True)
    try:
        partial = theirs != set(_shapes(abstract))
        return ckpt.restore_params(source.step, abstract, partial=partial)
    finally:
        ckpt.close()


class Reference:
    """The loop's batch hook of a full-fine-tuning DPO run: adds the frozen reference's
    per-token log-probs (`ref_logp`) to each batch, train and eval alike."""

    def __init__(self, plan: RunPlan, params: Any) -> None:
        self.plan, self.params = plan, params
        model = plan.config.model
        batch = NamedSharding(plan.mesh, PartitionSpec(BATCH_AXES))

        def logp(params: Any, b: dict[str, jax.Array]) -> jax.Array:
            logits = reference_logits(model, params, b)
            return losses.token_log_probs(logits, b["targets"], b["mask"])

        self._logp = jax.jit(logp, out_shardings=batch)

    def train_batch(self, state: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self.eval_batch(state.params, batch)

    def eval_batch(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with use_mesh(self.plan.mesh, self.plan.rules):
            return {**batch, "ref_logp": self._logp(self.params, batch)}
