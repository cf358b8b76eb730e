"""`task.kind=contrastive`: sentence embeddings trained with in-batch-negative InfoNCE.

Batches are packed text pairs (`jaxlm.data.contrastive`): the anchor of a row's k-th pair is
segment 2k + 1, its positive segment 2k + 2. Each sequence's embedding is its last hidden
states pooled (`task.pooling`: mean, cls or last) and L2-normalised; anchor i's loss is the
cross-entropy of picking its own positive among the positives of every pair in the global
batch, with cosine similarities divided by `task.contrastive_temperature`. The batch is one
array sharded over the devices, so the [N, N] similarity matrix spans all of them (XLA gathers
the positives): the negatives are the whole global batch, not one device's shard.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.data import open_source
from jaxlm.data.contrastive import build_contrastive_dataset, pair_counts
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.lm import LMTask
from jaxlm.tasks.pairs import last_tokens, segment_sums


def pool_segments(hidden_BTD: jax.Array, segments_BT: jax.Array, pooling: str) -> jax.Array:
    """[B, T + 1, D] float32 embeddings of each segment id of each row (index = segment id;
    ids without tokens give zeros): mean of its hidden states, its first ("cls") or its last
    ("last") token's."""
    h_BTD = hidden_BTD.astype(jnp.float32)
    present_BT = segments_BT != 0
    if pooling == "mean":
        weight_BT = present_BT.astype(jnp.float32)
    elif pooling == "last":
        weight_BT = last_tokens(segments_BT).astype(jnp.float32)
    else:  # cls: each segment's first token
        before_BT = jnp.pad(segments_BT[:, :-1], ((0, 0), (1, 0)))
        weight_BT = (present_BT & (segments_BT != before_BT)).astype(jnp.float32)
    t = segments_BT.shape[1]

    def sums(x, s):
        return jax.ops.segment_sum(x, s, num_segments=t + 1)

    total_BSD = jax.vmap(sums)(h_BTD * weight_BT[..., None], segments_BT)
    count_BS = segment_sums(weight_BT, segments_BT)
    return total_BSD / jnp.maximum(count_BS, 1.0)[..., None]


def normalize(x_ND: jax.Array) -> jax.Array:
    return x_ND * jax.lax.rsqrt(jnp.maximum(jnp.sum(x_ND * x_ND, -1, keepdims=True), 1e-12))


def info_nce(
    anchors_ND: jax.Array, positives_ND: jax.Array, valid_N: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """(loss [N], correct [N]) of each valid anchor: -log softmax_j(cos(a_i, p_j) / t)[i] over
    the valid positives j, and whether its own positive is the most similar (zero if invalid)."""
    sim_NN = normalize(anchors_ND) @ normalize(positives_ND).T / temperature
    sim_NN = jnp.where(valid_N[None, :], sim_NN, -1e30)
    own_N = jnp.diagonal(sim_NN)
    loss_N = jax.nn.logsumexp(sim_NN, axis=1) - own_N
    correct_N = jnp.argmax(sim_NN, axis=1) == jnp.arange(sim_NN.shape[0])
    return jnp.where(valid_N, loss_N, 0.0), correct_N & valid_N


def pair_embeddings(
    hidden_BTD: jax.Array, segments_BT: jax.Array, pooling: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(anchors [N, D], positives [N, D], valid [N]) over the rows' pair slots, N = B * P."""
    pooled_BSD = pool_segments(hidden_BTD, segments_BT, pooling)
    present_BS = segment_sums(jnp.ones(segments_BT.shape, jnp.float32), segments_BT) > 0
    p = (pooled_BSD.shape[1] - 1) // 2
    d = pooled_BSD.shape[-1]
    anchors = pooled_BSD[:, 1 : 2 * p : 2].reshape(-1, d)
    positives = pooled_BSD[:, 2 : 2 * p + 1 : 2].reshape(-1, d)
    valid = (present_BS[:, 1 : 2 * p : 2] & present_BS[:, 2 : 2 * p + 1 : 2]).reshape(-1)
    return anchors, positives, valid


class ContrastiveTask(LMTask):
    """In-batch-negative InfoNCE on the pooled last hidden states of text pairs."""

    kind = "contrastive"
    trains_text = False  # embeddings: the run's closing text sample would show nothing

    def check(self, tokenizer: Tokenizer) -> None:
        config = self.config
        if config.data.batch_size < 2:
            raise ValueError(
                f"task.kind=contrastive contrasts each pair with the others of its batch, but "
                f"data.batch_size={config.data.batch_size}; use at least 2 (in-batch negatives "
                "grow with the batch: 32-512 is usual)"
            )
        if config.train.microbatches != 1:
            raise ValueError(
                f"task.kind=contrastive needs the whole batch in one pass (its negatives are the "
                f"other pairs of the batch), but train.microbatches={config.train.microbatches}; "
                "set train.microbatches=1"
            )
        data = config.data
        for split in (data.train_split, data.eval_split):
            source = open_source(data.dataset, split, data_dir=data.data_dir, text_key=RECORD_KEY)
            counts = pair_counts(source, tokenizer, data.seq_len)
            if counts.single and not config.model.dropout:
                raise ValueError(
                    f"{source!r}: {counts.single} record(s) have one text, whose two views differ "
                    "only by dropout (SimCSE), but model.dropout=0; set model.dropout (e.g. 0.1) "
                    "or give each record an 'anchor' and a 'positive'"
                )
            if split == data.train_split and counts.pairs < 2:
                raise ValueError(f"{source!r}: {counts.pairs} pair(s); contrasting needs >= 2")
            if jax.process_index() == 0:
                print(f"contrastive {split}: {counts.summary(data.seq_len)}", file=sys.stderr)

    def records(self, tokenizer: Tokenizer) -> tuple[str | None, Callable[..., Any] | None]:
        return RECORD_KEY, build_contrastive_dataset

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        pairs = (jnp.max(batch["segment_ids"], axis=1) + 1) // 2
        return jnp.maximum(jnp.sum(pairs).astype(jnp.float32), 1.0)

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        hidden, aux = self.forward(params, batch, rng, hidden=True)
        task = self.config.task
        anchors, positives, valid = pair_embeddings(hidden, batch["segment_ids"], task.pooling)
        loss, correct = info_nce(anchors, positives, valid, task.contrastive_temperature)
        return {
            "loss": jnp.sum(loss),
            "pairs": jnp.sum(valid.astype(jnp.float32)),
            "correct": jnp.sum(correct.astype(jnp.float32)),
            **self.aux_terms(aux),
        }

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        n = jnp.maximum(terms["pairs"], 1.0)
        return {
            "loss": terms["loss"] / n,
            "accuracy": terms["correct"] / n,
            "pairs": terms["pairs"],
        }

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        terms = self.loss_terms(params, batch)
        return {k: terms[k] for k in ("loss", "pairs", "correct")}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        return {
            "eval_loss": sums.get("loss", 0.0) / n,
            # Top-1 retrieval of each anchor's positive among its eval batch's positives.
            "eval_accuracy": sums.get("correct", 0.0) / n,
            "eval_pairs": sums.get("pairs", 0.0),
        }
