"""The chat (SFT) pipeline: records → template → token ids and trained-on mask → truncate →
first-fit packing (a conversation is never split across rows) → next-token targets → batches.

Batches have the packed-text keys (`jaxlm.data.pipeline`); `mask` is 1 only where the target is
an assistant token (every token with `train_on_prompt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_experimental

from jaxlm.data.chat import Template, conversation, encode_chat
from jaxlm.data.pipeline import next_token_rows, record_stream, segment_spans, token_bytes
from jaxlm.data.sources import record_where
from jaxlm.data.tokenizer import Tokenizer


def encode_record(
    record: str,
    tokenizer: Tokenizer,
    template: Template,
    seq_len: int,
    train_on_prompt: bool = False,
    where: str = "record",
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, trained-on mask, truncated) of one record, cut to `seq_len` tokens."""
    ids, mask = encode_chat(conversation(record, where), tokenizer, template)
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    train = np.ones(len(ids), np.int32) if train_on_prompt else np.asarray(mask, np.int32)
    return np.asarray(ids, np.int32), train, truncated


@dataclasses.dataclass(frozen=True)
class ChatStats:
    """What a pass over a split found: conversations, truncated ones, and those dropped because
    nothing trainable was left after truncation."""

    records: int
    truncated: int
    dropped: int
    trained_tokens: int

    def summary(self, seq_len: int) -> str:
        return (
            f"{self.records} conversations, {self.truncated} longer than data.seq_len={seq_len} "
            f"(truncated), {self.dropped} dropped (no assistant token left after truncation), "
            f"{self.trained_tokens} trained-on target tokens"
        )


def chat_stats(
    source: Sequence[str],
    tokenizer: Tokenizer,
    template: Template,
    seq_len: int,
    train_on_prompt: bool = False,
) -> ChatStats:
    """Render and check every record of `source` (a bad one raises, naming its index)."""
    truncated = dropped = trained = 0
    for i in range(len(source)):
        _, train, cut = encode_record(
            source[i], tokenizer, template, seq_len, train_on_prompt, record_where(source, i)
        )
        targets = int(train[1:].sum())
        truncated += cut
        dropped += targets == 0
        trained += targets
    return ChatStats(len(source), truncated, dropped, trained)


@dataclasses.dataclass(frozen=True)
class _Encode(grain.transforms.Map):
    tokenizer: Any
    template: Any
    seq_len: int
    train_on_prompt: bool

    def map(self, record: str) -> dict[str, np.ndarray]:
        ids, train, _ = encode_record(
            record, self.tokenizer, self.template, self.seq_len, self.train_on_prompt
        )
        return {"tokens": ids, "train": train}


@dataclasses.dataclass(frozen=True)
class _HasTargets(grain.transforms.Filter):
    def filter(self, example: dict[str, np.ndarray]) -> bool:
        return bool(example["train"][1:].any())


def first_prompts(segments: np.ndarray, train: np.ndarray) -> np.ndarray:
    """[T] booleans: each segment's tokens before its first trained-on token (a conversation's
    first prompt, which a prefix LM reads bidirectionally, as it reads a prompt when sampling)."""
    prefix = np.zeros(segments.shape, bool)
    for start, end in segment_spans(segments):
        trained = np.flatnonzero(train[start:end])
        prefix[start : start + (trained[0] if len(trained) else end - start)] = True
    return prefix


@dataclasses.dataclass(frozen=True)
class _ChatTargets(grain.transforms.Map):
    pad_id: int
    token_bytes: np.ndarray
    prefix: bool = False  # add `prefix`: the first prompts (a prefix-LM model)

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        segments, train = packed["tokens_segment_ids"], packed["train"]
        row = next_token_rows(
            packed["tokens"], segments, self.pad_id, self.token_bytes, trained=train
        )
        return {**row, "prefix": first_prompts(segments, train)} if self.prefix else row


def build_chat_dataset(
    source: Sequence[str],
    tokenizer: Tokenizer,
    *,
    template: Template,
    train_on_prompt: bool = False,
    prefix: bool = False,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: int = 0,
    num_shards: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
    **_: Any,  # add_bos / add_eos: the template decides where BOS and EOS go
) -> grain.IterDataset:
    """One stream of packed chat batches (the same arguments as `build_dataset`, plus the
    template): stream i reads records i, i + n, ..., shuffled with `seed` each epoch. With
    `prefix`, batches also hold `prefix` (`first_prompts`), for a prefix-LM model."""
    ds = record_stream(source, shard, num_shards, seed, shuffle, num_epochs)
    ds = ds.map(_Encode(tokenizer, template, seq_len, train_on_prompt)).filter(_HasTargets())
    targets = _ChatTargets(tokenizer.pad_id, token_bytes(tokenizer), prefix)
    return first_fit_batches(
        ds, ("tokens", "train"), targets, seq_len, batch_size, worker_count, drop_remainder
    )


def first_fit_batches(
    ds: grain.MapDataset,
    keys: Sequence[str],
    targets: grain.transforms.Map,
    seq_len: int,
    batch_size: int,
    worker_count: int,
    drop_remainder: bool,
) -> grain.IterDataset:
    """Encoded units (each whole: a conversation, a preference pair) first-fit packed into rows
    of `seq_len` over `keys`, turned into batch keys by `targets`, and batched."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if worker_count == 0 else 4))
    it = grain_experimental.FirstFitPackIterDataset(
        it,
        length_struct=dict.fromkeys(keys, seq_len),
        num_packing_bins=max(2, batch_size),
        shuffle_bins=False,
    )
    return it.map(targets).batch(batch_size, drop_remainder=drop_remainder)
