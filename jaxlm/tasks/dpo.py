"""`task.kind=dpo`: Direct Preference Optimisation on preference pairs (Rafailov et al., 2023).

With sequence log-probabilities log π(y|x) of the policy and log π_ref(y|x) of the reference,
and h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) for the chosen
y_w and rejected y_l reply, the per-pair loss is
- sigmoid (`task.dpo_loss="sigmoid"`): −(1 − ε) log σ(β h) − ε log σ(−β h), ε = label smoothing;
- IPO (`"ipo"`, Azar et al., 2023): (h − 1 / (2β))².
The reference is the model without its adapters (LoRA or prompt tuning): the frozen base
weights are already in the run's parameters, so no second copy of them is held. The implicit
rewards β (log π − log π_ref) of each reply give the metrics: rewards of the chosen and rejected
reply, their margin, the accuracy (the chosen reward is the larger) and the policy accuracy
(the chosen reply is the more likely under the policy alone).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.configs.model import LoRAConfig
from jaxlm.data import open_source
from jaxlm.data.chat import Template, get_template
from jaxlm.data.preference import build_preference_dataset, pair_stats
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model.lora import is_adapter
from jaxlm.model.transformer import Transformer
from jaxlm.tasks.base import partition
from jaxlm.tasks.lm import LMTask


def sequence_log_probs(token_logp_BT: jax.Array, segments_BT: jax.Array) -> jax.Array:
    """Per-row sums of the token log-probs of each segment: [B, T + 1] (index = segment id)."""
    t = segments_BT.shape[1]
    return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=t + 1))(
        token_logp_BT, segments_BT
    )


def pair_log_probs(
    token_logp_BT: jax.Array, segments_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, valid): each [B, P] over the row's pair slots k (segments 2k + 1 and
    2k + 2); `valid` where both sequences of the pair have reply tokens."""
    logp = sequence_log_probs(token_logp_BT, segments_BT)
    count = sequence_log_probs(mask_BT.astype(jnp.float32), segments_BT)
    pairs = (logp.shape[1] - 1) // 2
    chosen, rejected = logp[:, 1 : 2 * pairs : 2], logp[:, 2 : 2 * pairs + 1 : 2]
    valid = (count[:, 1 : 2 * pairs : 2] > 0) & (count[:, 2 : 2 * pairs + 1 : 2] > 0)
    return chosen, rejected, valid


def dpo_losses(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """The per-pair DPO (or IPO) loss from sequence log-probs (see the module docstring)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - (
        label_smoothing * jax.nn.log_sigmoid(-beta * h)
    )


class DPOTask(LMTask):
    """DPO on packed preference pairs (`jaxlm.data.preference`): the batch keys are the packed
    text keys, `mask` on the reply targets; only the adapters train."""

    kind = "dpo"

    def template(self, tokenizer: Tokenizer) -> Template:
        return get_template(self.config.task.chat_template, tokenizer)

    def check(self, tokenizer: Tokenizer) -> None:
        model = self.config.model
        if not (model.lora.rank or model.prompt_tokens):
            raise ValueError(
                "task.kind=dpo trains adapters against the model without them (its reference): "
                "set model.lora.rank (e.g. --set model.lora.rank=8) or model.prompt_tokens"
            )
        data = self.config.data
        template = self.template(tokenizer)
        for split in (data.train_split, data.eval_split):
            source = open_source(data.dataset, split, data_dir=data.data_dir, text_key=RECORD_KEY)
            stats = pair_stats(source, tokenizer, template, data.seq_len)
            if split == data.train_split and stats.dropped == stats.pairs:
                raise ValueError(
                    f"{source!r}: no pair fits ({stats.summary(data.seq_len)}); raise data.seq_len"
                )
            if jax.process_index() == 0:
                print(f"dpo {split}: {stats.summary(data.seq_len)}", file=sys.stderr)

    def records(self, tokenizer: Tokenizer) -> tuple[str | None, Callable[..., Any] | None]:
        return RECORD_KEY, functools.partial(
            build_preference_dataset, template=self.template(tokenizer)
        )

    def trainable(self, name: str) -> bool:
        return is_adapter(name)

    def reference_logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """Logits of the model without adapters: the frozen base parameters alone."""
        model = dataclasses.replace(self.config.model, lora=LoRAConfig(), prompt_tokens=0)
        base, _ = partition(params, lambda name: not is_adapter(name))
        logits, _, _ = Transformer(model).apply(
            {"params": jax.lax.stop_gradient(base)},
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
        )
        return logits

    def pair_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        task = self.config.task
        targets, mask, segments = batch["targets"], batch["mask"], batch["segment_ids"]
        logits, aux = self.forward(params, batch, rng)
        policy = pair_log_probs(losses.token_log_probs(logits, targets, mask), segments, mask)
        ref_logits = self.reference_logits(params, batch)
        ref = pair_log_probs(losses.token_log_probs(ref_logits, targets, mask), segments, mask)
        (pc, pr, valid), (rc, rr, _) = policy, ref
        per_pair = dpo_losses(pc, pr, rc, rr, task.beta, task.dpo_loss, task.label_smoothing)
        w = valid.astype(jnp.float32)
        chosen_reward, rejected_reward = task.beta * (pc - rc), task.beta * (pr - rr)
        return {
            "loss": jnp.sum(per_pair * w),
            "pairs": jnp.sum(w),
            "correct": jnp.sum((chosen_reward > rejected_reward) * w),
            "policy_correct": jnp.sum((pc > pr) * w),
            "chosen_reward": jnp.sum(chosen_reward * w),
            "rejected_reward": jnp.sum(rejected_reward * w),
            "chosen_logp": jnp.sum(pc * w),
            "rejected_logp": jnp.sum(pr * w),
            **self.aux_terms(aux),
        }

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        segments = batch["segment_ids"]
        pairs = (jnp.max(segments, axis=1) + 1) // 2  # each row's pairs: segments 1..2P
        return jnp.maximum(jnp.sum(pairs).astype(jnp.float32), 1.0)

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        return self.pair_terms(params, batch, rng)

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        n = jnp.maximum(terms["pairs"], 1.0)
        chosen, rejected = terms["chosen_reward"] / n, terms["rejected_reward"] / n
        return {
            "loss": terms["loss"] / n,
            "accuracy": terms["correct"] / n,
            "policy_accuracy": terms["policy_correct"] / n,
            "rewards_chosen": chosen,
            "rewards_rejected": rejected,
            "margin": chosen - rejected,
            "logp_chosen": terms["chosen_logp"] / n,
            "logp_rejected": terms["rejected_logp"] / n,
            "pairs": terms["pairs"],
        }

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        terms = self.pair_terms(params, batch)
        keys = ("loss", "pairs", "correct", "policy_correct", "chosen_reward", "rejected_reward")
        return {k: terms[k] for k in keys}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        return {
            "eval_loss": sums.get("loss", 0.0) / n,
            "eval_accuracy": sums.get("correct", 0.0) / n,
            # The policy alone: the chosen reply is the more likely one.
            "eval_policy_accuracy": sums.get("policy_correct", 0.0) / n,
            "eval_margin": (sums.get("chosen_reward", 0.0) - sums.get("rejected_reward", 0.0)) / n,
            "eval_pairs": sums.get("pairs", 0.0),
        }
