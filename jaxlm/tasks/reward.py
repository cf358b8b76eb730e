"""`task.kind=reward`: a reward model trained on preference pairs with the Bradley-Terry loss.

The model has a score head (`model.head="score"`: one scalar per position); a sequence's reward
r is the score at its last token (the end of the reply's turn). The per-pair loss is
−log σ(r_chosen − r_rejected), the negative log-likelihood of the preference under the
Bradley-Terry model; metrics: pairwise accuracy (r_chosen > r_rejected), the mean margin, and
the mean reward of each side. With LoRA the adapters and the score head train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.chat import conversation, encode_chat, get_template
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.distributed import to_host
from jaxlm.model.transformer import Transformer
from jaxlm.sample import bucket
from jaxlm.tasks.pairs import PairTask, last_tokens, pair_sums

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig


class RewardTask(PairTask):
    """Bradley-Terry reward modelling on packed preference pairs."""

    kind = "reward"

    def check(self, tokenizer: Tokenizer) -> None:
        if self.config.model.head != "score":
            raise ValueError(
                "task.kind=reward needs a score head: set model.head=score (a language model's "
                "run can start it with --init-from: the score head starts fresh)"
            )
        super().check(tokenizer)

    def trainable(self, name: str) -> bool:
        return name.startswith("score/") or super().trainable(name)

    def pair_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        scores, aux = self.forward(params, batch, rng)
        segments = batch["segment_ids"]
        last = last_tokens(segments)
        rc, rr, valid = pair_sums(
            jnp.where(last, scores[..., 0].astype(jnp.float32), 0.0), segments, last
        )
        return {**self.totals(-jax.nn.log_sigmoid(rc - rr), rc, rr, valid), **self.aux_terms(aux)}


def score_chats(
    config: RunConfig,
    params: Any,
    tokenizer: Tokenizer,
    chats: Sequence[Sequence[dict[str, str]]],
    batch_size: int = 16,
) -> list[float]:
    """The reward of each conversation (rendered with the run's chat template): the score head
    at its last token. Call inside `use_mesh` for sharded parameters."""
    if config.model.head != "score":
        raise ValueError(f"model.head={config.model.head!r}: only a reward model scores")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    template = get_template(config.task.chat_template, tokenizer)
    encoded = [
        encode_chat(conversation({"messages": list(c)}, f"chat {i}"), tokenizer, template)[0]
        for i, c in enumerate(chats)
    ]
    limit = config.model.max_seq_len - config.model.prompt_tokens
    for i, ids in enumerate(encoded):
        if len(ids) > limit:
            raise ValueError(f"chat {i} has {len(ids)} tokens, more than model.max_seq_len={limit}")
    model = Transformer(config.model)
    scores_fn = jax.jit(lambda p, t, s: model.apply({"params": p}, t, None, s)[0][..., 0])
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        length = bucket(max(map(len, rows)), limit)
        tokens = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)], segments[r, : len(ids)] = ids, 1
        scores = to_host(scores_fn(params, tokens, segments))
        out += [float(scores[r, len(ids) - 1]) for r, ids in enumerate(rows)]
    return out
