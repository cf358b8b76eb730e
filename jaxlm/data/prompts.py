"""Prompts for online RL (`task.kind=ppo|grpo`): records → the chat template's generation prompt
→ one right-padded row per reply to sample.

A record is a JSON object with a `prompt` (a string, one user turn, or a list of messages) and
any other fields the reward reads (e.g. the expected answer): `{"prompt": "3+4=", "answer": "7"}`.
Rows hold `tokens` (the prompt, right-padded to the prompt budget), `lengths` (0 = an empty row)
and `record` (the record's index in its split, so the reward can read its fields). Each prompt
fills `group` consecutive rows of one batch (GRPO compares the replies of a group).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data.chat import Template, conversation, encode_chat
from jaxlm.data.pipeline import record_stream
from jaxlm.data.sources import record_where
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.files import parse_json


def prompt_record(record: str | dict[str, Any], where: str = "record") -> dict[str, Any]:
    """The record as a dict, checked to hold a non-empty `prompt`."""
    if isinstance(record, str):
        record = parse_json(record, where)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise ValueError(f"{where}: expected a 'prompt', got keys {sorted(record)}")
    return record


def prompt_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The prompt's turns (a string prompt is one user turn)."""
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: the prompt is empty")
        return [{"role": "user", "content": value}]
    turns = conversation({"messages": value}, f"{where}: 'prompt'", need_reply=False)
    if not turns:
        raise ValueError(f"{where}: the prompt is empty")
    return turns


def encode_prompt(
    record: str | dict[str, Any], tokenizer: Tokenizer, template: Template, where: str = "record"
) -> list[int]:
    """The token ids of the record's prompt with the generation prompt (the assistant's turn)."""
    messages = prompt_messages(prompt_record(record, where), where)
    return encode_chat(messages, tokenizer, template, add_generation_prompt=True)[0]


@dataclasses.dataclass(frozen=True)
class PromptStats:
    prompts: int
    too_long: int
    longest: int

    def summary(self, budget: int) -> str:
        return (
            f"{self.prompts} prompts (longest {self.longest} tokens), {self.too_long} longer than "
            f"the prompt budget of {budget} tokens (data.seq_len - task.max_new_tokens; dropped)"
        )


def prompt_stats(
    source: Sequence[str], tokenizer: Tokenizer, template: Template, budget: int
) -> PromptStats:
    """A pass over every record: each is checked (errors name its file and line)."""
    too_long = longest = 0
    for i in range(len(source)):
        n = len(encode_prompt(source[i], tokenizer, template, record_where(source, i)))
        too_long += n > budget
        longest = max(longest, n)
    return PromptStats(len(source), too_long, longest)


class _Indexed(Sequence):
    """(index, record) pairs of a source, so rows remember which record they came from."""

    def __init__(self, source: Sequence[str]) -> None:
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[int, str]:  # type: ignore[override]
        return index, self._source[index]

    def __repr__(self) -> str:
        return repr(self._source)


@dataclasses.dataclass(frozen=True)
class _Encode(grain.transforms.Map):
    tokenizer: Tokenizer
    template: Template
    budget: int

    def map(self, item: tuple[int, str]) -> dict[str, np.ndarray]:
        index, record = item
        ids = encode_prompt(record, self.tokenizer, self.template, f"record {index}")
        tokens = np.full((self.budget,), self.tokenizer.pad_id, np.int32)
        fits = len(ids) <= self.budget
        if fits:
            tokens[: len(ids)] = ids
        return {
            "tokens": tokens,
            "lengths": np.int32(len(ids) if fits else 0),
            "record": np.int32(index),
        }


class _Fits(grain.transforms.Filter):
    def filter(self, row: dict[str, np.ndarray]) -> bool:
        return bool(row["lengths"] > 0)


@dataclasses.dataclass(frozen=True)
class _Repeat(grain.transforms.Map):
    group: int

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.repeat(v, self.group, axis=0) for k, v in batch.items()}


def build_prompt_dataset(
    source: Sequence[str],
    tokenizer: Tokenizer,
    *,
    template: Template,
    budget: int,
    group: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard: int = 0,
    num_shards: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
    **_: Any,  # seq_len / add_bos / add_eos: the budget and the template decide
) -> grain.IterDataset:
    """One stream of prompt batches of `batch_size` rows (`batch_size / group` prompts, each
    repeated `group` times), the same stream arguments as `build_dataset`."""
    if batch_size % group:
        raise ValueError(f"a stream's {batch_size} rows do not split into groups of {group}")
    ds = record_stream(_Indexed(source), shard, num_shards, seed, shuffle, num_epochs)
    ds = ds.map(_Encode(tokenizer, template, budget)).filter(_Fits())
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if worker_count == 0 else 4))
    return it.batch(batch_size // group, drop_remainder=drop_remainder).map(_Repeat(group))


def empty_prompts(n: int, budget: int, pad_id: int) -> dict[str, np.ndarray]:
    """`n` rows that hold no prompt (what an exhausted evaluation stream contributes)."""
    return {
        "tokens": np.full((n, budget), pad_id, np.int32),
        "lengths": np.zeros((n,), np.int32),
        "record": np.zeros((n,), np.int32),
    }


def load_records(source: Sequence[str]) -> list[dict[str, Any]]:
    """Every record of `source` as a dict (what a reward function is given)."""
    return [json.loads(source[i]) for i in range(len(source))]
