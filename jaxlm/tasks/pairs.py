"""What the preference tasks (DPO, reward models) share: the pair data, its checks, and sums
of per-token values over each sequence of the packed pairs."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlm.data import open_source
from jaxlm.data.chat import Template, get_template
from jaxlm.data.preference import build_preference_dataset, pair_stats
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.lm import LMTask


def segment_sums(values_BT: jax.Array, segments_BT: jax.Array) -> jax.Array:
    """Per-row sums of `values` over each segment: [B, T + 1] (index = segment id)."""
    t = segments_BT.shape[1]
    return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=t + 1))(
        values_BT, segments_BT
    )


def pair_sums(
    values_BT: jax.Array, segments_BT: jax.Array, present_BT: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected, valid), each [B, P] over the row's pair slots k (segments 2k + 1 and
    2k + 2): the sums of `values` over each sequence; `valid` where both sequences of the pair
    have some `present` position."""
    sums = segment_sums(values_BT, segments_BT)
    count = segment_sums(present_BT.astype(jnp.float32), segments_BT)
    p = (sums.shape[1] - 1) // 2
    chosen, rejected = sums[:, 1 : 2 * p : 2], sums[:, 2 : 2 * p + 1 : 2]
    valid = (count[:, 1 : 2 * p : 2] > 0) & (count[:, 2 : 2 * p + 1 : 2] > 0)
    return chosen, rejected, valid


def last_tokens(segments_BT: jax.Array) -> jax.Array:
    """Where each sequence (segment) ends: its last token, [B, T] bool."""
    following = jnp.pad(segments_BT[:, 1:], ((0, 0), (0, 1)))
    return (segments_BT != 0) & (segments_BT != following)


class PairTask(LMTask):
    """Batches of packed preference pairs (`jaxlm.data.preference`); the loss is per pair."""

    def template(self, tokenizer: Tokenizer) -> Template:
        return get_template(self.config.task.chat_template, tokenizer)

    def check(self, tokenizer: Tokenizer) -> None:
        """Every pair of both splits renders and is checked; says how many were cut or dropped."""
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
                print(f"{self.kind} {split}: {stats.summary(data.seq_len)}", file=sys.stderr)

    def records(self, tokenizer: Tokenizer) -> tuple[str | None, Callable[..., Any] | None]:
        return RECORD_KEY, functools.partial(
            build_preference_dataset, template=self.template(tokenizer)
        )

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        pairs = (jnp.max(batch["segment_ids"], axis=1) + 1) // 2  # a row's pairs: segments 1..2P
        return jnp.maximum(jnp.sum(pairs).astype(jnp.float32), 1.0)

    # Extra per-pair means beyond loss/accuracy/rewards/margin: {metric name: term key}.
    extra_metrics: ClassVar[dict[str, str]] = {}
    extra_eval_metrics: ClassVar[dict[str, str]] = {}

    def pair_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """The batch's sums (see `totals`) and the model's aux terms."""
        raise NotImplementedError

    @staticmethod
    def totals(
        loss: jax.Array,
        chosen_reward: jax.Array,
        rejected_reward: jax.Array,
        valid: jax.Array,
        **extra: jax.Array,
    ) -> dict[str, jax.Array]:
        """Sums over the valid pairs ([B, P] each) of the loss, the rewards, the pairs whose
        chosen reward is the larger, and of each `extra` per-pair value."""
        w = valid.astype(jnp.float32)
        sums = {
            "loss": loss,
            "correct": (chosen_reward > rejected_reward).astype(jnp.float32),
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            **extra,
        }
        return {"pairs": jnp.sum(w), **{k: jnp.sum(v * w) for k, v in sums.items()}}

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
            "rewards_chosen": chosen,
            "rewards_rejected": rejected,
            "margin": chosen - rejected,
            "pairs": terms["pairs"],
            **{name: terms[key] / n for name, key in self.extra_metrics.items()},
        }

    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        terms = self.pair_terms(params, batch)
        keys = ("loss", "pairs", "correct", "chosen_reward", "rejected_reward")
        return {k: terms[k] for k in (*keys, *self.extra_eval_metrics.values())}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        margin = sums.get("chosen_reward", 0.0) - sums.get("rejected_reward", 0.0)
        return {
            "eval_loss": sums.get("loss", 0.0) / n,
            "eval_accuracy": sums.get("correct", 0.0) / n,
            "eval_margin": margin / n,
            **{f"eval_{k}": sums.get(v, 0.0) / n for k, v in self.extra_eval_metrics.items()},
            "eval_pairs": sums.get("pairs", 0.0),
        }
