"""`task.kind=mlm`: masked-language-model pre-training of an encoder (BERT, RoBERTa).

Batches are packed text rows corrupted in the pipeline (`jaxlm.data.masking`): `tokens` hold the
mask / random / kept tokens, `targets` the originals, `mask` the chosen positions. The loss is
the cross-entropy of the originals at the chosen positions only; the metrics add the accuracy
of the top prediction there. With `task.max_predictions` K, each row has at most K chosen
tokens, listed in `predict_positions`, and the vocabulary head runs on those K only.
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
            max_predictions=task.max_predictions,
        )

    def rows(self, tokenizer: Tokenizer) -> Any:
        return MaskedRows(self.masking(tokenizer))

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        spec = super().batch_spec()
        k = self.config.task.max_predictions
        if k is not None:  # the chosen positions, listed: the head runs on them only
            b = self.config.data.batch_size
            spec |= {"predict_positions": ((b, k), jnp.int32), "predict_valid": ((b, k), jnp.bool_)}
        return spec

    def token_sums(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        if "predict_positions" in batch:  # [B, K] logits of the chosen positions only
            at = batch["predict_positions"]
            logits, aux = self.forward(params, batch, rng, logits_at=at)
            targets, mask = jnp.take_along_axis(batch["targets"], at, 1), batch["predict_valid"]
        else:
            logits, aux = self.forward(params, batch, rng)
            targets, mask = batch["targets"], batch["mask"]
        sums = losses.cross_entropy_sums(logits, targets, mask)
        hit = (jnp.argmax(logits, axis=-1) == targets) & mask
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
