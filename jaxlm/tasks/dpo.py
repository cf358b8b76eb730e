"""`task.kind=dpo`: Direct Preference Optimisation on preference pairs (Rafailov et al., 2023).

With sequence log-probabilities log π(y|x) of the policy and log π_ref(y|x) of the reference,
and h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) for the chosen
y_w and rejected y_l reply, the per-pair loss is
- sigmoid (`task.dpo_loss="sigmoid"`): −(1 − ε) log σ(β h) − ε log σ(−β h), ε = label smoothing;
- IPO (`"ipo"`, Azar et al., 2023): (h − 1 / (2β))².
The reference is the model without its adapters (LoRA or prompt tuning): the frozen base
weights are already in the run's parameters, so no second copy of them is held. A full
fine-tune's reference is a frozen copy of the model it started from (`jaxlm.tasks.reference`),
whose token log-probs each batch carries as `ref_logp`. The implicit
rewards β (log π − log π_ref) of each reply give the metrics: rewards of the chosen and rejected
reply, their margin, the accuracy (the chosen reward is the larger) and the policy accuracy
(the chosen reply is the more likely under the policy alone).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.base import adapterless_logits, check_causal
from jaxlm.tasks.pairs import PairTask, pair_sums
from jaxlm.tasks.reference import Reference, check_reference_given, has_adapters, load_reference


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


class DPOTask(PairTask):
    """DPO on packed preference pairs (`jaxlm.data.preference`): the batch keys are the packed
    text keys, `mask` on the reply targets (and `ref_logp` with a frozen reference); with
    adapters only they train, else every parameter."""

    kind = "dpo"
    extra_metrics: ClassVar[dict[str, str]] = {
        "policy_accuracy": "policy_correct",
        "logp_chosen": "chosen_logp",
        "logp_rejected": "rejected_logp",
    }
    # The policy alone: the chosen reply is the more likely one.
    extra_eval_metrics: ClassVar[dict[str, str]] = {"policy_accuracy": "policy_correct"}

    def check(self, tokenizer: Tokenizer) -> None:
        model = self.config.model
        if model.head != "lm":
            raise ValueError(f"task.kind=dpo trains a language model; model.head={model.head!r}")
        check_causal(self.config)
        check_reference_given(self.config)
        super().check(tokenizer)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        spec = super().batch_spec()
        if self.frozen_reference:  # the reference's token log-probs, added by `Reference`
            spec["ref_logp"] = (spec["tokens"][0], jnp.float32)
        return spec

    @property
    def frozen_reference(self) -> bool:
        """Whether the reference is a frozen copy (a full fine-tune, or `task.reference`)."""
        return not has_adapters(self.config.model) or bool(self.config.task.reference)

    def make_rollouts(self, plan: Any) -> Any:
        return Reference(plan, load_reference(plan)) if self.frozen_reference else None

    def reference_logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """Logits of the model without adapters: the frozen base parameters alone."""
        return adapterless_logits(self.config.model, params, batch)

    def pair_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        task = self.config.task
        targets, mask, segments = batch["targets"], batch["mask"], batch["segment_ids"]
        logits, aux = self.forward(params, batch, rng)
        policy = pair_sums(losses.token_log_probs(logits, targets, mask), segments, mask)
        if "ref_logp" in batch:
            ref_tokens = batch["ref_logp"]
        else:
            ref_tokens = losses.token_log_probs(self.reference_logits(params, batch), targets, mask)
        ref = pair_sums(ref_tokens, segments, mask)
        (pc, pr, valid), (rc, rr, _) = policy, ref
        per_pair = dpo_losses(pc, pr, rc, rr, task.beta, task.dpo_loss, task.label_smoothing)
        return {
            **self.totals(
                per_pair,
                task.beta * (pc - rc),
                task.beta * (pr - rr),
                valid,
                policy_correct=(pc > pr).astype(jnp.float32),
                chosen_logp=pc,
                rejected_logp=pr,
            ),
            **self.aux_terms(aux),
        }
