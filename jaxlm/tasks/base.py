"""The task interface: what a batch holds, the pure loss the step takes, which parameters train.

A way to train (causal LM, SFT, and later reward models, DPO, distillation, MLM) is a `Task`
plugged into the one run setup (`jaxlm.run`) and the one step loop (`jaxlm.loop`); neither knows
more of a task than this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
from jax.sharding import Mesh

from jaxlm import losses
from jaxlm.model.lora import is_adapter
from jaxlm.model.transformer import Transformer

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig
    from jaxlm.data.pipeline import StreamIterator
    from jaxlm.data.tokenizer import Tokenizer


def param_names(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'/'-joined paths of every leaf of a nested parameter dict, in tree order."""
    names = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        names += param_names(value, name + "/") if isinstance(value, Mapping) else [name]
    return names


def partition(params: Mapping[str, Any], trainable: Any) -> tuple[dict, dict]:
    """(trainable, frozen): the leaves whose path `trainable(path)` accepts, and the rest, each a
    nested dict holding only its own leaves (empty branches dropped)."""

    def split(tree: Mapping[str, Any], prefix: str) -> tuple[dict, dict]:
        train, frozen = {}, {}
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                t, f = split(value, name + "/")
                if t:
                    train[key] = t
                if f:
                    frozen[key] = f
            elif trainable(name):
                train[key] = value
            else:
                frozen[key] = value
        return train, frozen

    return split(params, "")


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of `partition`)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


def adapterless_logits(model: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Logits of the model (`ModelConfig` `model`) without its adapters (LoRA, prompt tuning):
    the frozen base parameters alone, with no gradient (the reference of DPO, PPO and GRPO)."""
    import dataclasses

    from jaxlm.configs.model import LoRAConfig

    base_model = dataclasses.replace(model, lora=LoRAConfig(), prompt_tokens=0, value_head=False)
    base, _ = partition(params, lambda name: not (is_adapter(name) or name.startswith("value/")))
    logits, _, _ = Transformer(base_model).apply(
        {"params": jax.lax.stop_gradient(base)},
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
    )
    return logits


def check_causal(config: RunConfig) -> None:
    """A clear error when a task that predicts the next token gets a bidirectional model."""
    if not config.model.causal:
        raise ValueError(
            f"task.kind={config.task.kind} predicts each next token, but model.causal=False lets "
            "every position see the tokens after it; train a bidirectional model with "
            "task.kind=mlm, or set model.causal=True"
        )


class Task:
    """Base class of the tasks. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str] = ""
    # Optimizer updates per training step, each on the whole batch (PPO's epochs on a rollout).
    updates_per_step: int = 1
    # Whether the task trains the model to write text (the loop's closing sample shows it).
    trains_text: ClassVar[bool] = True

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    # --- data ---------------------------------------------------------------------------
    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (global shape, dtype)} of one global batch."""
        raise NotImplementedError

    def check(self, tokenizer: Tokenizer) -> None:
        """Raise a clear error for a config this task cannot run (nothing compiled or written)."""

    def make_iterator(
        self,
        tokenizer: Tokenizer,
        *,
        split: str | None = None,
        seed: int = 0,
        mesh: Mesh | None = None,
        num_epochs: int | None = None,
        num_streams: int | None = None,
    ) -> StreamIterator:
        """This process's batches of `split` (train split, endless, by default)."""
        raise NotImplementedError

    # --- what trains ----------------------------------------------------------------------
    def trainable(self, name: str) -> bool:
        """Whether the parameter at '/'-joined path `name` is trained (others stay frozen: no
        gradient, no optimizer state, bitwise unchanged). With LoRA adapters or prompt-tuning
        embeddings, only they train; stored quantized weights (`*_q`, `*_scale`) never do."""
        model = self.config.model
        if model.lora.rank or model.prompt_tokens:
            return is_adapter(name)
        if model.quant.stored:
            return not name.rsplit("/", 1)[-1].endswith(("_q", "_scale"))
        return True

    # --- the loss -------------------------------------------------------------------------
    def forward(
        self,
        params: Any,
        batch: dict[str, jax.Array],
        rng: jax.Array | None = None,
        **kwargs: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits, the model's aux outputs) of the packed rows of `batch` (`kwargs` go to the
        model's call, e.g. `hidden=True` for the last hidden states instead of the logits)."""
        model = self.config.model
        rngs = {}
        if rng is not None and model.moe.router_jitter > 0:
            rngs["router"] = rng
        if rng is not None and (model.lora.dropout > 0 or model.dropout > 0):
            rngs["dropout"] = jax.random.fold_in(rng, 1)
        logits, _, aux = Transformer(model).apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            prefix_BT=batch.get("prefix"),  # a prefix LM's bidirectional prefixes
            rngs=rngs,
            **kwargs,
        )
        return logits, aux

    def aux_terms(self, aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The model's auxiliary loss ("aux") and MoE statistics, for `loss_terms`."""
        return {"aux": losses.aux_loss(aux), **losses.moe_metrics(aux)}

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        """What the summed loss of the whole batch is divided by (e.g. its target tokens)."""
        raise NotImplementedError

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Sums over one (micro)batch: "loss" (the objective, summed: divided by `normalizer`),
        "aux" (model auxiliary losses, a per-microbatch mean) and whatever `metrics` reads."""
        raise NotImplementedError

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        """Per-step metrics from the whole batch's summed terms (`total` = `normalizer`)."""
        return {"loss": terms["loss"] / total}

    def frozen_inputs(self, plan: Any) -> dict[str, Any] | None:
        """None, or frozen parameters besides the run's (a distillation teacher) that every
        train step takes as an argument: merged into the parameters `loss_terms` sees, never
        updated nor saved. Loaded once per run (`RunPlan.frozen_inputs`), before training."""
        return None

    # --- batches made from the current parameters (online RL) ----------------------------------
    def make_rollouts(self, plan: Any) -> Any:
        """None, or an object whose `train_batch(state, batch)` and `eval_batch(params, batch)`
        turn the iterator's batch into the batch the steps take, e.g. prompts into sampled,
        scored replies (`jaxlm.tasks.rollout`). Made once per run (`RunPlan.rollouts`); the loop
        calls `train_batch` every step and `eval_batch` on every eval batch."""
        return None

    # --- evaluation -----------------------------------------------------------------------
    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums over one eval batch, added up over the split and given to `eval_metrics`."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError
