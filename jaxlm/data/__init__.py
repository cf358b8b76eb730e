"""Tokenizers, text sources (TFDS array_record, local files, stdlib) and the Grain pipeline."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxlm.configs.run import DataConfig
from jaxlm.data.pipeline import (
    BATCH_KEYS,
    DataIterator,
    build_dataset,
    check_batch_size,
    pad_batch,
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
    "TextSource",
    "Tokenizer",
    "build_dataset",
    "check_batch_size",
    "check_corpus",
    "load_tokenizer",
    "make_iterator",
    "make_tokenizer",
    "open_source",
    "pad_batch",
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
) -> DataIterator:
    """This process's batch iterator for `config` (train split, endless, shuffled, by default).

    With `num_epochs=1` the records are still shuffled (with `seed`), so the first N batches of
    an evaluation are a fixed random sample of the split rather than its first documents.

    Everything is checked before any batch is made: the dataset exists, it is not empty and holds
    at least one sequence, and the batch splits over processes and the mesh's batch axes.
    """
    per_process = check_batch_size(config.batch_size, mesh, jax.process_count())
    split = split or config.train_split
    source = open_source(
        config.dataset,
        split,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        text_key=config.text_key,
        download=config.download,
    )
    check_corpus(source, tokenizer, config.seq_len)
    dataset = build_dataset(
        source,
        tokenizer,
        seq_len=config.seq_len,
        batch_size=per_process,
        seed=seed,
        shuffle=config.shuffle,
        num_epochs=num_epochs,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        add_bos=config.add_bos,
        add_eos=config.add_eos,
        worker_count=config.worker_count,
        drop_remainder=num_epochs is None,
    )
    return DataIterator(dataset)
