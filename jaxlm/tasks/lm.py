"""`task.kind=lm`: causal language-model pre-training on packed text (next-token prediction)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlm import losses
from jaxlm.data import make_iterator
from jaxlm.data.pipeline import StreamIterator
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.base import Task, check_causal


class LMTask(Task):
    """Masked next-token cross-entropy over packed rows (plus the z-loss and the model's aux
    losses); every parameter trains. Batches: `jaxlm.data.pipeline`'s packed text rows."""

    kind = "lm"

    def check(self, tokenizer: Tokenizer) -> None:
        if self.config.model.head != "lm":
            raise ValueError(
                f"task.kind={self.kind} trains a language model, but model.head="
                f"{self.config.model.head!r}; a reward model trains with task.kind=reward"
            )
        check_causal(self.config)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        b, t = self.config.data.batch_size, self.config.data.seq_len
        spec: dict[str, tuple[tuple[int, ...], Any]] = {
            k: ((b, t), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")
        }
        return {**spec, "mask": ((b, t), jnp.bool_), "target_bytes": ((b,), jnp.int32)}

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
        text_key, dataset_fn = self.records(tokenizer)
        rows = self.rows(tokenizer)
        return make_iterator(
            self.config.data,
            tokenizer,
            split=split,
            seed=seed,
            mesh=mesh,
            num_epochs=num_epochs,
            num_streams=num_streams,
            text_key=text_key,
            dataset_fn=dataset_fn,
            **({} if rows is None else {"rows": rows}),
        )

    def rows(self, tokenizer: Tokenizer) -> Any:
        """The pipeline step from packed rows to batch rows; None = next-token targets."""
        return None

    def records(self, tokenizer: Tokenizer) -> tuple[str | None, Callable[..., Any] | None]:
        """(the source's `text_key`, the stream builder) `make_iterator` uses; (None, None) =
        `config.data.text_key` and packed text."""
        return None, None

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

    def token_sums(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        logits, aux = self.forward(params, batch, rng)
        sums = losses.cross_entropy_sums(logits, batch["targets"], batch["mask"])
        return {**sums, **self.aux_terms(aux)}

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        terms = self.token_sums(params, batch, rng)
        return {"loss": terms["nll"] + self.config.train.z_loss * terms["z"], **terms}

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        return {
            "loss": terms["nll"] / total,
            "z_loss": terms["z"] / total,
            "tokens": terms["count"],
            "bits_per_byte": terms["nll"]
            / math.log(2)
            / jnp.maximum(jnp.sum(batch["target_bytes"]), 1),
        }

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        terms = self.token_sums(params, batch)
        return {
            "nll": terms["nll"],
            "count": terms["count"],
            "bytes": jnp.sum(batch["target_bytes"]),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nll, count = sums.get("nll", 0.0), sums.get("count", 0.0)
        loss = nll / max(count, 1.0)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 80.0)),
            "eval_bits_per_byte": nll / math.log(2) / max(sums.get("bytes", 0.0), 1.0),
            "eval_tokens": count,
        }
