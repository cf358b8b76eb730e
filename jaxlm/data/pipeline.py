"""The Grain pipeline: shard → shuffle → tokenize → pack → targets → batch → global arrays.

Batches are dicts of [B, T] arrays: `tokens` (inputs), `targets` (the next token of the same
document), `mask` (1 where a target exists), `segment_ids` (1, 2, ... per document in the row,
0 = padding), `positions` (restart at 0 in each segment), and `target_bytes` [B] (UTF-8 bytes of
the masked-in targets, for bits per byte). Iterator state is a JSON-serialisable dict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags as absl_flags
from grain import experimental as grain_experimental
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer
from jaxlm.sharding import BATCH_AXES

BATCH_KEYS = ("tokens", "targets", "mask", "segment_ids", "positions")


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """[V] UTF-8 bytes each token id stands for (0 for special ids)."""
    table = np.zeros(tokenizer.vocab_size, np.int32)
    if isinstance(tokenizer, ByteTokenizer):
        table[tokenizer.offset :] = 1
        return table
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    for i in range(tokenizer.vocab_size):
        if i in specials:
            continue
        if isinstance(tokenizer, SentencePieceTokenizer):
            sp = tokenizer._sp
            if sp.is_byte(i):
                table[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                table[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode())
        elif isinstance(tokenizer, HFTokenizer):
            token = tokenizer._tok.id_to_token(i)
            # Byte-level BPE spells each byte as one character; otherwise decode the token.
            byte_level = "ByteLevel" in type(tokenizer._tok.decoder).__name__
            table[i] = len(token) if byte_level and token else len(tokenizer.decode([i]).encode())
        else:
            table[i] = len(tokenizer.decode([i]).encode("utf-8", errors="surrogateescape"))
    return table


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
    tokenizer: Any
    add_bos: bool
    add_eos: bool

    def map(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        ids = [self.tokenizer.bos_id] * self.add_bos + ids + [self.tokenizer.eos_id] * self.add_eos
        return {"tokens": np.asarray(ids, np.int32)}


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 wherever the segment id changes along the last axis."""
    t = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(t), segment_ids.shape)
    changed = np.ones(segment_ids.shape, bool)
    changed[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start = np.maximum.accumulate(np.where(changed, index, 0), axis=-1)
    return (index - start).astype(np.int32)


def segment_spans(segments: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of one non-zero segment id in a packed row [T]."""
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
    ends = np.r_[starts[1:], len(segments)]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if segments[s] != 0]


def next_token_rows(
    tokens: np.ndarray,
    segments: np.ndarray,
    pad_id: int,
    token_bytes: np.ndarray,
    trained: np.ndarray | None = None,
) -> dict[str, Any]:
    """A packed row as the batch keys: each token's target is the next token of its segment;
    `mask` marks targets that exist (and, with `trained`, whose token is trained on)."""
    tokens, segments = tokens.astype(np.int32), segments.astype(np.int32)
    mask = np.zeros(tokens.shape, bool)
    mask[:-1] = (segments[1:] == segments[:-1]) & (segments[:-1] != 0)
    if trained is not None:
        mask[:-1] &= trained[1:].astype(bool)
    targets = np.full(tokens.shape, pad_id, np.int32)
    targets[:-1] = tokens[1:]
    targets = np.where(mask, targets, pad_id).astype(np.int32)
    return {
        "tokens": np.where(segments != 0, tokens, pad_id).astype(np.int32),
        "targets": targets,
        "mask": mask,
        "segment_ids": segments,
        # Rows are independent: a document split across rows restarts at position 0.
        "positions": segment_positions(segments),
        "target_bytes": np.int32(token_bytes[targets][mask].sum()),
    }


@dataclasses.dataclass(frozen=True)
class _NextTokenTargets(grain.transforms.Map):
    pad_id: int
    token_bytes: np.ndarray

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        return next_token_rows(
            packed["tokens"], packed["tokens_segment_ids"], self.pad_id, self.token_bytes
        )


def record_stream(
    source: Sequence[Any],
    shard: int,
    num_shards: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
) -> grain.MapDataset:
    """Stream `shard` of `num_shards` over the records (i, i + n, ...), shuffled with `seed`
    (differently each epoch) and repeated `num_epochs` times (None = endlessly)."""
    if len(source) == 0:
        raise ValueError(f"the corpus {source!r} is empty")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} must be in [0, {num_shards})")
    if num_shards > len(source):
        raise ValueError(
            f"{num_shards} data streams need at least as many records, but the corpus "
            f"{source!r} holds {len(source)}; lower data.streams"
        )
    ds = grain.MapDataset.source(source)[shard::num_shards]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs) if num_epochs != 1 else ds


SHUFFLE_WINDOW_TOKENS = 1 << 19
SHUFFLE_WINDOW_MAX_ROWS = 4096


def shuffle_window_rows(seq_len: int, batch_size: int = 1, epoch_chars: int | None = None) -> int:
    """Rows per window of the packed-row shuffle: about `SHUFFLE_WINDOW_TOKENS` tokens, at most
    `SHUFFLE_WINDOW_MAX_ROWS` rows (each is made in Python), no more than an epoch of a stream of
    `epoch_chars` characters holds (a small corpus: a longer window would only re-read it), and
    at least one batch."""
    rows = min(SHUFFLE_WINDOW_MAX_ROWS, SHUFFLE_WINDOW_TOKENS // seq_len)
    if epoch_chars is not None:
        rows = min(rows, -(-epoch_chars // seq_len))
    return max(batch_size, rows)


_SMALL_STREAM_RECORDS = 256


def _stream_chars(source: Sequence[Any], shard: int, num_shards: int) -> int | None:
    """Characters in stream `shard`'s records, when it has few enough to count (else None)."""
    records = range(shard, len(source), num_shards)
    if len(records) > _SMALL_STREAM_RECORDS:
        return None
    return sum(len(source[i]) for i in records)


def grain_state(state: Any) -> Any:
    """A Grain iterator state as Grain made it, from its JSON round trip: Grain compares the
    `remainder_slices` of a packing iterator with tuples, which JSON turns into lists."""
    if isinstance(state, dict):
        return {
            k: {n: tuple(v) for n, v in s.items()} if k == "remainder_slices" else grain_state(s)
            for k, s in state.items()
        }
    if isinstance(state, list):  # e.g. the states of worker processes
        return [grain_state(s) for s in state]
    return state


def build_dataset(
    source: Sequence[str],
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
    rows: grain.transforms.Map | grain.transforms.RandomMap | None = None,
) -> grain.IterDataset:
    """One stream of packed batches of `batch_size` rows.

    Records are split into `num_shards` streams first (stream i reads records i, i + n, ...), then
    shuffled with `seed` (differently each epoch), tokenized, concatenated and split into rows of
    `seq_len` tokens (no token dropped or repeated); with `shuffle`, the rows are shuffled again
    in windows of `shuffle_window_rows(seq_len)` (about 512k tokens), turned into the batch keys
    by `rows` (default: next-token targets; a `RandomMap` such as masked LM's corruption gets a
    generator seeded by `seed`, the stream and the row's index), then batched.

    The row shuffle is what makes a batch a sample of many documents: without it the rows of one
    long document (a 16k-character record is 128 rows of 128 bytes) fill many consecutive
    batches, so training loss is measured on text the model has just been fitted to, and the
    updates follow one document at a time.
    """
    ds = record_stream(source, shard, num_shards, seed, shuffle, num_epochs)
    ds = ds.map(_Tokenize(tokenizer, add_bos, add_eos))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if worker_count == 0 else 4))
    it = grain_experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})
    if shuffle:
        it = grain_experimental.WindowShuffleIterDataset(
            it,
            window_size=shuffle_window_rows(
                seq_len, batch_size, _stream_chars(source, shard, num_shards)
            ),
            seed=seed + 7919 * shard,
        )
    if isinstance(rows, grain.transforms.RandomMap):
        # Seeded per stream; the row index (in the iterator state) seeds each row's draw.
        it = it.random_map(rows, seed=(seed * 1_000_003 + 7919 * shard + 1) % 2**32)
    else:
        it = it.map(rows or _NextTokenTargets(tokenizer.pad_id, token_bytes(tokenizer)))
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        # Grain's worker processes read absl flags; outside an absl.app main nothing parsed them.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def check_batch_size(global_batch: int, mesh: Mesh | None, process_count: int) -> int:
    """The per-process batch size; a clear error when the global batch does not split evenly."""
    if global_batch % process_count:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the {process_count} processes"
        )
    if mesh is not None:
        # The batch is split over every one of BATCH_AXES (outside MoE layers `expert` is data
        # parallel too).
        dp = math.prod(mesh.shape[a] for a in BATCH_AXES)
        if global_batch % dp:
            axes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
            raise ValueError(
                f"batch_size={global_batch} is not divisible by the data-parallel size {dp} "
                f"(mesh {axes}); use a multiple of {dp}"
            )
    return global_batch // process_count


def process_rows(mesh: Mesh | None, global_batch: int) -> np.ndarray:
    """The rows of the global batch that this process's devices hold (sorted)."""
    if mesh is None:
        per, p = global_batch // jax.process_count(), jax.process_index()
        return np.arange(p * per, (p + 1) * per)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(global_batch)[index[0]])
    return np.asarray(sorted(rows))


def to_global(
    batch: dict[str, np.ndarray],
    mesh: Mesh,
    rows: np.ndarray | None = None,
    global_batch: int | None = None,
) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays split over the mesh's batch axes.

    `rows`: the global row index of each local row (`process_rows(mesh, global_batch)`); None =
    this process's rows are one contiguous block, in process order.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    if rows is None:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
    if global_batch is None:
        raise ValueError("to_global: pass global_batch together with rows")

    def place(v: np.ndarray) -> jax.Array:
        def shard(index: tuple[slice, ...]) -> np.ndarray:
            return v[np.searchsorted(rows, np.arange(global_batch)[index[0]])]

        return jax.make_array_from_callback((global_batch, *v.shape[1:]), sharding, shard)

    return {k: place(v) for k, v in batch.items()}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Fill a short final batch with empty rows (mask 0, segment 0) up to `batch_size`."""
    missing = batch_size - len(batch["tokens"])
    if missing <= 0:
        return batch
    out = {}
    for k, v in batch.items():
        fill = pad_id if k in ("tokens", "targets") else 0
        out[k] = np.concatenate([v, np.full((missing, *v.shape[1:]), fill, v.dtype)])
    return out


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`n` rows that hold nothing (mask 0, segment 0): what an exhausted stream contributes."""
    tokens = np.full((n, seq_len), pad_id, np.int32)
    zeros = np.zeros((n, seq_len), np.int32)
    return {
        "tokens": tokens,
        "targets": tokens.copy(),
        "mask": np.zeros((n, seq_len), bool),
        "segment_ids": zeros,
        "positions": zeros.copy(),
        "target_bytes": np.zeros((n,), np.int32),
    }


class StreamIterator:
    """This process's rows of global batches made of `num_streams` independent streams.

    The global batch is the concatenation of one batch of `global_batch / num_streams` rows from
    each stream (stream s reads records s, s + num_streams, ...), so its contents depend only on
    the number of streams, never on how many processes share the work: a process builds just the
    streams its rows come from (several, one, or a part of one shared with other processes).

    With `pad_id` set (evaluation, one epoch), an exhausted stream contributes empty rows and
    iteration stops when all of this process's streams are exhausted.
    """

    def __init__(
        self,
        make_stream: Callable[[int], grain.IterDataset],
        num_streams: int,
        global_batch: int,
        rows: np.ndarray,
        seq_len: int,
        pad_id: int | None = None,
        empty: Callable[[int], dict[str, np.ndarray]] | None = None,
    ) -> None:
        if global_batch % num_streams:
            raise ValueError(
                f"batch_size={global_batch} is not divisible by data.streams={num_streams}"
            )
        self.num_streams, self.global_batch, self.rows = num_streams, global_batch, rows
        self._per_stream, self._seq_len, self._pad_id = global_batch // num_streams, seq_len, pad_id
        self._empty = empty or (lambda n: empty_rows(n, seq_len, pad_id or 0))
        self.streams = sorted({int(r) // self._per_stream for r in rows})
        self._its = {s: iter(make_stream(s)) for s in self.streams}
        self._exhausted: set[int] = set()
        first = {s: i * self._per_stream for i, s in enumerate(self.streams)}
        self._take = np.asarray(
            [first[int(r) // self._per_stream] + int(r) % self._per_stream for r in rows]
        )

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def empty_batch(self) -> dict[str, np.ndarray]:
        return self._empty(len(self.rows))

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        for s in self.streams:
            if s not in self._exhausted:
                try:
                    batch = next(self._its[s])
                except StopIteration:
                    if self._pad_id is None:
                        raise
                    self._exhausted.add(s)
            if s in self._exhausted:
                batch = self._empty(self._per_stream)
            elif self._pad_id is not None:
                batch = pad_batch(batch, self._per_stream, self._pad_id)
            parts.append(batch)
        if len(self._exhausted) == len(self.streams):
            raise StopIteration
        return {k: np.concatenate([p[k] for p in parts])[self._take] for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """{"num_streams": S, "streams": {"s": Grain state}} for this process's streams."""
        states = {str(s): it.get_state() for s, it in self._its.items()}
        return {"num_streams": self.num_streams, "streams": states}

    def global_state(self) -> dict[str, Any]:
        """Every stream's state, gathered from all processes (a collective: all must call it);
        what a checkpoint saves."""
        from jaxlm import distributed

        return merge_stream_states(distributed.allgather_json(self.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        state = as_stream_state(state)
        if state["num_streams"] != self.num_streams:
            raise ValueError(
                f"the saved data position is for {state['num_streams']} data streams, this "
                f"iterator has {self.num_streams}; set data.streams={state['num_streams']}"
            )
        missing = [s for s in self.streams if str(s) not in state["streams"]]
        if missing:
            raise ValueError(f"the saved data position lacks streams {missing}")
        for s, it in self._its.items():
            it.set_state(grain_state(state["streams"][str(s)]))


def as_stream_state(state: dict[str, Any]) -> dict[str, Any]:
    """A saved iterator state in `StreamIterator`'s form (older checkpoints hold one plain
    Grain state: one stream)."""
    if "streams" in state:
        return state
    return {"num_streams": 1, "streams": {"0": state}}


def merge_stream_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state holding every stream, from the processes' `get_state()`s."""
    merged: dict[str, Any] = {}
    for state in states:
        merged.update(state["streams"])
    return {"num_streams": states[0]["num_streams"], "streams": merged}


class DataIterator:
    """Batches as NumPy dicts, with `get_state()` / `set_state()` for exact resume."""

    def __init__(self, dataset: grain.IterDataset) -> None:
        self._it = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(grain_state(state))
