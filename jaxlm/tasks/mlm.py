"""`task.kind=mlm`: masked-language-model pre-training of an encoder (BERT, RoBERTa).

Batches are packed text rows corrupted in the pipeline (`jaxlm.data.masking`): `tokens` hold the
mask / random / kept tokens, `targets` the originals, `mask` the chosen positions. The loss is
the cross-entropy of the originals at the chosen positions only; the metrics add the accuracy
of the top prediction there.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import losses
from jaxlm.data.masking import MaskedRows, Masking
from jaxlm.data.pipeline import token_bytes
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.lm import LMTask


class MLMTask(LMTask):
    """The LM task's batch keys and losses, on masked rows of a bidirectional model."""

    kind = "mlm"

    def check(self, tokenizer: Tokenizer) -> None:
        model = self.config.model
        if model.causal:
            raise ValueError(
                "task.kind=mlm fills masked tokens from both sides, but model.causal=True lets "
                "each position see only the tokens before it; set model.causal=False"
            )
        if model.head not in ("mlm", "lm"):
            raise ValueError(
                f"task.kind=mlm predicts tokens; model.head={model.head!r} has no vocabulary "
                "output (use model.head=mlm, BERT's head, or lm)"
            )
        self.masking(tokenizer)  # a tokenizer without a mask token fails here

    def masking(self, tokenizer: Tokenizer) -> Masking:
        task = self.config.task
        return Masking.make(
            tokenizer,
            self.config.model.vocab_size,
            token_bytes(tokenizer),
            mask_prob=task.mask_prob,
            mask_token_frac=task.mask_token_frac,
            random_token_frac=task.random_token_frac,
            whole_word=task.whole_word_masking,
        )

    def rows(self, tokenizer: Tokenizer) -> Any:
        return MaskedRows(self.masking(tokenizer))

    def token_sums(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        logits, aux = self.forward(params, batch, rng)
        sums = losses.cross_entropy_sums(logits, batch["targets"], batch["mask"])
        hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) & batch["mask"]
        return {**sums, "correct": jnp.sum(hit.astype(jnp.float32)), **self.aux_terms(aux)}

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        return {
            "loss": terms["nll"] / total,
            "z_loss": terms["z"] / total,
            "tokens": terms["count"],
            "accuracy": terms["correct"] / total,
        }

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        terms = self.token_sums(params, batch)
        return {"nll": terms["nll"], "count": terms["count"], "correct": terms["correct"]}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nll, count = sums.get("nll", 0.0), sums.get("count", 0.0)
        loss = nll / max(count, 1.0)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 80.0)),
            "eval_accuracy": sums.get("correct", 0.0) / max(count, 1.0),
            "eval_tokens": count,
        }
