"""`task.kind=prefix_lm`: prefix language modelling (T5 / UL2's PrefixLM) on packed text.

Each document piece in a packed row (a segment) is split at a point drawn uniformly from its
interior: the tokens before it are the prefix, read bidirectionally by a `model.prefix_lm`
model, and the loss is the next-token cross-entropy of the rest only (the last prefix token
predicts the first token of the rest). The split is drawn in the pipeline with a generator
seeded by the run's seed, the stream and the row, so batches resume exactly. When sampling,
the prompt is the prefix (`jaxlm.sample.prefill`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from jaxlm.data.pipeline import next_token_rows, segment_spans, token_bytes
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks.lm import LMTask


def split_prefixes(segments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[T] booleans: the prefix of each segment (non-zero id) of a packed row, its first k
    tokens with k uniform in [1, length - 1] (k = 1 for a segment of one token)."""
    prefix = np.zeros(segments.shape, bool)
    for start, end in segment_spans(segments):
        k = int(rng.integers(1, end - start)) if end - start > 1 else 1
        prefix[start : start + k] = True
    return prefix


@dataclasses.dataclass(frozen=True)
class PrefixRows(grain.transforms.RandomMap):
    """The pipeline's step from packed rows to prefix-LM batch rows: next-token rows whose
    `mask` keeps only the targets after the prefix, plus the `prefix` booleans."""

    pad_id: int
    token_bytes: np.ndarray

    def random_map(self, packed: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        segments = packed["tokens_segment_ids"]
        prefix = split_prefixes(segments, rng)
        row = next_token_rows(
            packed["tokens"], segments, self.pad_id, self.token_bytes, trained=~prefix
        )
        return {**row, "prefix": prefix}


class PrefixLMTask(LMTask):
    """The LM task's loss on the part of each sequence after its (bidirectional) prefix."""

    kind = "prefix_lm"

    def check(self, tokenizer: Tokenizer) -> None:
        super().check(tokenizer)
        if not self.config.model.prefix_lm:
            raise ValueError(
                "task.kind=prefix_lm reads each prefix bidirectionally, but model.prefix_lm="
                "False; set model.prefix_lm=true (or train a causal LM with task.kind=lm)"
            )

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        b, t = self.config.data.batch_size, self.config.data.seq_len
        return {**super().batch_spec(), "prefix": ((b, t), jnp.bool_)}

    def rows(self, tokenizer: Tokenizer) -> Any:
        return PrefixRows(tokenizer.pad_id, token_bytes(tokenizer))
