"""Preference pairs (DPO, reward models): records → chat template → one packed unit per pair.

A record is a JSON object with `chosen` and `rejected` and, usually, a `prompt`:
- strings: `{"prompt": "2+2=", "chosen": "4", "rejected": "5"}` (the prompt is a user turn);
- a prompt given as `messages`: `{"prompt": [{"role": "user", ...}, ...], "chosen": "...", ...}`;
- whole conversations: `{"chosen": [..., {"role": "assistant", ...}], "rejected": [...]}`, whose
  last turn is the assistant's reply and whose earlier turns are the (shared) prompt.

Each pair becomes one unit of two sequences, chosen then rejected, each its own segment of the
packed row (segments 2k + 1 and 2k + 2 for the row's k-th pair), so a pair is never split across
rows or devices and first-fit packing puts several short pairs in one row. `mask` marks the
targets of the reply only (never the prompt): the per-sequence log-probability is the sum of the
masked target log-probs of its segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.chat import Template, conversation, encode_chat
from jaxlm.data.pipeline import next_token_rows, record_stream, token_bytes
from jaxlm.data.sft import first_fit_batches
from jaxlm.data.sources import record_where
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.files import parse_json


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value.strip() else []
    return conversation({"messages": value}, where, need_reply=False)


def pair_conversations(
    record: str | dict[str, Any], where: str = "record"
) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a preference record, checked."""
    if isinstance(record, str):
        record = parse_json(record, where)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"{where}: expected 'chosen' and 'rejected', got keys {sorted(record)}")
    replies = {}
    prompts = {}
    for side in ("chosen", "rejected"):
        value = record[side]
        if isinstance(value, str):
            replies[side] = value
            prompts[side] = None
        else:
            turns = conversation({"messages": value}, f"{where}: {side!r}")
            if turns[-1]["role"] != "assistant":
                raise ValueError(f"{where}: the last turn of {side!r} must be the assistant's")
            replies[side], prompts[side] = turns[-1]["content"], turns[:-1]
        if not replies[side].strip():
            raise ValueError(f"{where}: the {side!r} reply is empty")
    if "prompt" in record:
        prompt = _turns(record["prompt"], f"{where}: 'prompt'")
        prompt = prompt + (prompts["chosen"] or [])
        if (prompts["chosen"] or []) != (prompts["rejected"] or []):
            raise ValueError(f"{where}: 'chosen' and 'rejected' continue different prompts")
    elif prompts["chosen"] is None or prompts["chosen"] != prompts["rejected"]:
        raise ValueError(
            f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations with "
            "the same turns before the reply"
        )
    else:
        prompt = prompts["chosen"]
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty")
    if replies["chosen"] == replies["rejected"]:
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' are the same reply ({replies['chosen']!r:.60}); "
            "a pair must differ to say which is preferred"
        )
    return prompt, replies["chosen"], replies["rejected"]


def encode_reply(
    prompt: list[dict[str, str]], reply: str, tokenizer: Tokenizer, template: Template
) -> tuple[list[int], list[bool]]:
    """(token ids, reply mask) of the prompt followed by the assistant's `reply`: the mask is on
    the reply's tokens (and the end of its turn) only."""
    head, _ = encode_chat(prompt, tokenizer, template, add_generation_prompt=True)
    ids, train = encode_chat(
        [*prompt, {"role": "assistant", "content": reply}], tokenizer, template
    )
    if ids[: len(head)] != head:
        raise ValueError(
            "the chat template renders the prompt differently once a reply follows it; "
            "preference pairs need a template whose generation prompt is a prefix of the chat"
        )
    return ids, [False] * len(head) + list(train[len(head) :])


def encode_pair(
    record: str,
    tokenizer: Tokenizer,
    template: Template,
    seq_len: int,
    where: str = "record",
) -> dict[str, np.ndarray] | None:
    """The pair as one unit: `tokens` (chosen then rejected), `half` (0 on the chosen sequence, 1
    on the rejected one) and `train` (the reply tokens). None when the two do not fit in one row
    of `seq_len` tokens with at least one reply token of each."""
    prompt, chosen, rejected = pair_conversations(record, where)
    parts = [encode_reply(prompt, r, tokenizer, template) for r in (chosen, rejected)]
    (c, _), (r, _) = parts
    if len(c) + len(r) > seq_len:
        # Both share one row: cut the end of the longer (each keeps at least half the row).
        keep_c = min(len(c), max(seq_len // 2, seq_len - len(r)))
        keeps = (keep_c, seq_len - keep_c)
        parts = [(ids[:k], train[:k]) for (ids, train), k in zip(parts, keeps, strict=True)]
    if not all(any(train[1:]) for _, train in parts):
        return None
    return {
        "tokens": np.concatenate([np.asarray(ids, np.int32) for ids, _ in parts]),
        "half": np.concatenate(
            [np.full(len(ids), h, np.int32) for h, (ids, _) in enumerate(parts)]
        ),
        "train": np.concatenate([np.asarray(t, np.int32) for _, t in parts]),
    }


@dataclasses.dataclass(frozen=True)
class PairStats:
    """What a pass over a split found."""

    pairs: int
    truncated: int
    dropped: int

    def summary(self, seq_len: int) -> str:
        return (
            f"{self.pairs} preference pairs, {self.truncated} cut to fit data.seq_len={seq_len} "
            f"(both sequences of a pair share a row), {self.dropped} dropped (no reply token left)"
        )


def pair_stats(
    source: Sequence[str], tokenizer: Tokenizer, template: Template, seq_len: int
) -> PairStats:
    """Render and check every record of `source` (a bad one raises, naming its index)."""
    truncated = dropped = 0
    for i in range(len(source)):
        where = record_where(source, i)
        prompt, chosen, rejected = pair_conversations(source[i], where)
        lengths = [len(encode_reply(prompt, r, tokenizer, template)[0]) for r in (chosen, rejected)]
        truncated += sum(lengths) > seq_len
        dropped += encode_pair(source[i], tokenizer, template, seq_len, where) is None
    return PairStats(len(source), truncated, dropped)


@dataclasses.dataclass(frozen=True)
class _EncodePair(grain.transforms.Map):
    tokenizer: Any
    template: Any
    seq_len: int

    def map(self, record: str) -> dict[str, np.ndarray]:
        pair = encode_pair(record, self.tokenizer, self.template, self.seq_len)
        return pair if pair is not None else {}


@dataclasses.dataclass(frozen=True)
class _Fits(grain.transforms.Filter):
    def filter(self, example: dict[str, np.ndarray]) -> bool:
        return bool(example)


def pair_segments(pair_ids: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Segment ids of the sequences: 2k + 1 (chosen) and 2k + 2 (rejected) for pair k = 1, 2, ...
    of the row (`pair_ids` from packing, 0 = padding)."""
    return np.where(pair_ids > 0, 2 * (pair_ids - 1) + half + 1, 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _PairTargets(grain.transforms.Map):
    pad_id: int
    token_bytes: np.ndarray

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        segments = pair_segments(packed["tokens_segment_ids"], packed["half"])
        return next_token_rows(
            packed["tokens"], segments, self.pad_id, self.token_bytes, trained=packed["train"]
        )


def build_preference_dataset(
    source: Sequence[str],
    tokenizer: Tokenizer,
    *,
    template: Template,
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
    """One stream of packed preference batches (the arguments of `build_dataset`, plus the
    template): the packed-text batch keys, with pairs as described in the module docstring."""
    ds = record_stream(source, shard, num_shards, seed, shuffle, num_epochs)
    ds = ds.map(_EncodePair(tokenizer, template, seq_len)).filter(_Fits())
    targets = _PairTargets(tokenizer.pad_id, token_bytes(tokenizer))
    keys = ("tokens", "half", "train")
    return first_fit_batches(ds, keys, targets, seq_len, batch_size, worker_count, drop_remainder)
