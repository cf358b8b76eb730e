"""Tokenizers, text sources (TFDS array_record, local files, stdlib) and the Grain pipeline."""

from __future__ import annotations

from collections.abc import Callable

import grain
import jax
from jax.sharding import Mesh

from jaxlm.configs.run import DataConfig
from jaxlm.data.pipeline import (
    BATCH_KEYS,
    DataIterator,
    StreamIterator,
    as_stream_state,
    build_dataset,
    check_batch_size,
    merge_stream_states,
    pad_batch,
    process_rows,
    to_global,
    token_bytes,
)
from jaxlm.data.sources import TextSource, open_source, stdlib_files
from jaxlm.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataIterator",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "StreamIterator",
    "TextSource",
    "Tokenizer",
    "as_stream_state",
    "build_dataset",
    "check_batch_size",
    "check_corpus",
    "load_tokenizer",
    "make_iterator",
    "make_tokenizer",
    "merge_stream_states",
    "open_source",
    "pad_batch",
    "process_rows",
    "stdlib_files",
    "to_global",
    "token_bytes",
]


def check_corpus(source: TextSource, tokenizer: Tokenizer, seq_len: int) -> None:
    """Raise if the corpus is empty or shorter than one sequence (reads only what it needs)."""
    if len(source) == 0:
        raise ValueError(f"the corpus {source!r} is empty")
    total = 0
    for i in range(len(source)):
        total += len(tokenizer.encode(source[i])) + 2
        if total >= seq_len:
            return
    raise ValueError(
        f"the corpus {source!r} holds {total} tokens, fewer than one sequence of "
        f"seq_len={seq_len}; use more text or a shorter data.seq_len"
    )


def make_iterator(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    split: str | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
    num_epochs: int | None = None,
    num_streams: int | None = None,
    text_key: str | None = None,
    dataset_fn: Callable[..., grain.IterDataset] | None = None,
    empty: Callable[[int], dict] | None = None,
    rows: grain.transforms.Map | grain.transforms.RandomMap | None = None,
) -> StreamIterator:
    """This process's batch iterator for `config` (train split, endless, shuffled, by default).

    The global batch is made of `num_streams` streams (default `config.streams`, else one per
    process; see `StreamIterator`); this process builds only the rows its devices hold, in
    `process_rows(mesh, config.batch_size)` order (pass `it.rows` to `to_global`).

    With `num_epochs=1` the records are still shuffled (with `seed`), so the first N batches of
    an evaluation are a fixed random sample of the split rather than its first documents; short
    and exhausted streams are filled with empty rows.

    Everything is checked before any batch is made: the dataset exists, it is not empty and holds
    at least one sequence, and the batch splits over processes, streams and the mesh's batch axes.

    `dataset_fn` (default `build_dataset`, packed text) builds each stream from the source with
    `build_dataset`'s arguments; `text_key` overrides `config.text_key`; `empty(n)` makes the
    `n` empty rows of an exhausted evaluation stream (default: empty packed-text rows); `rows`
    (packed text only) turns packed rows into the batch keys (see `build_dataset`).
    """
    check_batch_size(config.batch_size, mesh, jax.process_count())
    num_streams = num_streams or config.streams or jax.process_count()
    if config.batch_size % num_streams:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by data.streams={num_streams}"
        )
    split = split or config.train_split
    source = open_source(
        config.dataset,
        split,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        text_key=text_key or config.text_key,
        download=config.download,
    )
    if dataset_fn is None:
        check_corpus(source, tokenizer, config.seq_len)
    elif len(source) == 0:
        raise ValueError(f"the dataset {source!r} is empty")
    if num_streams > len(source):
        raise ValueError(
            f"data.streams={num_streams} exceeds the {len(source)} records of {source!r}; "
            "use fewer streams"
        )

    if rows is not None and dataset_fn is not None:
        raise ValueError("make_iterator: `rows` applies to packed text, not to a dataset_fn")
    extra = {} if rows is None else {"rows": rows}

    def stream(index: int) -> grain.IterDataset:
        return (dataset_fn or build_dataset)(
            source,
            tokenizer,
            seq_len=config.seq_len,
            batch_size=config.batch_size // num_streams,
            seed=seed,
            shuffle=config.shuffle,
            num_epochs=num_epochs,
            shard=index,
            num_shards=num_streams,
            add_bos=config.add_bos,
            add_eos=config.add_eos,
            worker_count=config.worker_count,
            drop_remainder=num_epochs is None,
            **extra,
        )

    return StreamIterator(
        stream,
        num_streams,
        config.batch_size,
        process_rows(mesh, config.batch_size),
        config.seq_len,
        pad_id=None if num_epochs is None else tokenizer.pad_id,
        empty=empty,
    )
