"""Text pairs for contrastive embeddings (task.kind=contrastive): records → one packed unit each.

A record is a JSON object with an `anchor` and its `positive` (a query and its passage, a
docstring and its function), or only a `text` (also accepted: an `anchor` alone), whose two
views are the same tokens under different dropout noise (SimCSE; needs model.dropout > 0).
Each text is encoded as in pre-training ([bos] text [eos] with `add_bos` / `add_eos`); the two
sequences of a pair are one unit, packed first-fit into rows as segments 2k + 1 (anchor) and
2k + 2 (positive) of the row's k-th pair, so a pair is never split across rows or devices. The
other pairs of the whole global batch are each anchor's negatives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.pipeline import next_token_rows, record_stream, token_bytes
from jaxlm.data.preference import pair_segments
from jaxlm.data.sft import first_fit_batches
from jaxlm.data.sources import record_where
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.files import parse_json


def text_pair(record: str | dict[str, Any], where: str = "record") -> tuple[str, str | None]:
    """(anchor, positive) of a record, checked; positive is None for a single text (SimCSE)."""
    if isinstance(record, str):
        try:
            record = parse_json(record, where)
        except ValueError as e:
            raise ValueError(
                f"{e}; contrastive training reads JSON records with 'anchor' and 'positive' "
                "(or 'text'): set data.dataset to such JSONL files"
            ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "anchor" in record:
        anchor, positive = record["anchor"], record.get("positive")
    elif "text" in record:
        anchor, positive = record["text"], None
    else:
        raise ValueError(
            f"{where}: expected 'anchor' and 'positive' (a pair) or 'text' (one text, two "
            f"dropout views), got keys {sorted(record)}"
        )
    for name, value in (("anchor", anchor), ("positive", positive)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {name!r} must be a non-empty string, got {value!r:.60}")
    return anchor, positive


def encode_text_pair(
    record: str | dict[str, Any],
    tokenizer: Tokenizer,
    seq_len: int,
    add_bos: bool = True,
    add_eos: bool = True,
    where: str = "record",
) -> dict[str, np.ndarray]:
    """The pair as one unit: `tokens` (anchor then positive, each cut to half the row at most)
    and `half` (0 on the anchor, 1 on the positive)."""
    anchor, positive = text_pair(record, where)
    parts = []
    for text in (anchor, anchor if positive is None else positive):
        ids = [tokenizer.bos_id] * add_bos + tokenizer.encode(text) + [tokenizer.eos_id] * add_eos
        parts.append(ids[: seq_len // 2])
    return {
        "tokens": np.asarray(parts[0] + parts[1], np.int32),
        "half": np.repeat(np.asarray([0, 1], np.int32), [len(parts[0]), len(parts[1])]),
    }


@dataclasses.dataclass(frozen=True)
class PairCounts:
    """What a pass over a split found."""

    pairs: int
    single: int  # records with one text (SimCSE views)
    truncated: int

    def summary(self, seq_len: int) -> str:
        return (
            f"{self.pairs} text pairs ({self.single} single texts with two dropout views), "
            f"{self.truncated} cut to half of data.seq_len={seq_len}"
        )


def pair_counts(source: Sequence[Any], tokenizer: Tokenizer, seq_len: int) -> PairCounts:
    """Check every record of `source` (a bad one raises, naming its index) and count them."""
    single = truncated = 0
    for i in range(len(source)):
        anchor, positive = text_pair(source[i], record_where(source, i))
        single += positive is None
        texts = (anchor,) if positive is None else (anchor, positive)
        truncated += any(len(tokenizer.encode(t)) + 2 > seq_len // 2 for t in texts)
    return PairCounts(len(source), single, truncated)


@dataclasses.dataclass(frozen=True)
class _EncodeTextPair(grain.transforms.Map):
    tokenizer: Any
    seq_len: int
    add_bos: bool
    add_eos: bool

    def map(self, record: Any) -> dict[str, np.ndarray]:
        return encode_text_pair(record, self.tokenizer, self.seq_len, self.add_bos, self.add_eos)


@dataclasses.dataclass(frozen=True)
class _PairRows(grain.transforms.Map):
    pad_id: int
    token_bytes: np.ndarray

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        segments = pair_segments(packed["tokens_segment_ids"], packed["half"])
        return next_token_rows(packed["tokens"], segments, self.pad_id, self.token_bytes)


def build_contrastive_dataset(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: int = 0,
    num_shards: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
    worker_count: int = 0,
    drop_remainder: bool = True,
    **_: Any,
) -> grain.IterDataset:
    """One stream of packed text-pair batches (the arguments of `build_dataset`): the
    packed-text batch keys, with pairs as described in the module docstring."""
    ds = record_stream(source, shard, num_shards, seed, shuffle, num_epochs)
    ds = ds.map(_EncodeTextPair(tokenizer, seq_len, add_bos, add_eos))
    rows = _PairRows(tokenizer.pad_id, token_bytes(tokenizer))
    return first_fit_batches(
        ds, ("tokens", "half"), rows, seq_len, batch_size, worker_count, drop_remainder
    )
