"""The Grain pipeline: packing loses nothing, targets stay in their document, exact resume."""

import collections
import json

import jax
import numpy as np
import pytest

from jaxlm.configs import DataConfig, MeshConfig
from jaxlm.data import (
    ByteTokenizer,
    DataIterator,
    StreamIterator,
    build_dataset,
    check_batch_size,
    make_iterator,
    merge_stream_states,
    pad_batch,
    to_global,
)
from jaxlm.sharding import make_mesh

TOK = ByteTokenizer()
RNG = np.random.default_rng(0)
# Documents of very different lengths (1 to 300 bytes), each starting with a unique tag.
DOCS = [f"<doc{i}>" + "x" * int(RNG.integers(0, 300)) + "é" for i in range(60)]


def _all_batches(source, **kw):
    kw = dict(seq_len=64, batch_size=4, seed=1, num_epochs=1, drop_remainder=False) | kw
    return list(DataIterator(build_dataset(source, TOK, **kw)))


def _rows(batches):
    return [
        {k: b[k][r] for k in b if k != "target_bytes"}
        for b in batches
        for r in range(len(b["tokens"]))
    ]


def _segments(row):
    for s in np.unique(row["segment_ids"]):
        if s:
            yield row["tokens"][row["segment_ids"] == s]


def test_an_epoch_holds_every_token_exactly_once():
    rows = _rows(_all_batches(DOCS))
    got = collections.Counter()
    for row in rows:
        for seg in _segments(row):
            got.update(seg.tolist())
    assert got == _token_counts(DOCS)


def test_segments_are_contiguous_pieces_of_one_document_with_restarting_positions():
    docs = {tuple([TOK.bos_id, *TOK.encode(d), TOK.eos_id]) for d in DOCS}
    stream = [list(d) for d in docs]
    for row in _rows(_all_batches(DOCS)):
        seg_ids = row["segment_ids"]
        # Segment ids count up from 1 along the row; padding (0) only at the end.
        used = seg_ids[seg_ids > 0]
        assert np.all(np.diff(used) >= 0) and used[0] == 1
        assert np.all(seg_ids[len(used) :] == 0)
        for s in np.unique(used):
            where = np.flatnonzero(seg_ids == s)
            assert np.all(np.diff(where) == 1)  # contiguous
            np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
            piece = row["tokens"][where].tolist()
            assert any(_contains(d, piece) for d in stream), piece


def _contains(doc, piece):
    n = len(piece)
    return any(doc[i : i + n] == piece for i in range(len(doc) - n + 1))


def test_targets_are_the_next_token_of_the_same_document():
    for row in _rows(_all_batches(DOCS)):
        tokens, targets, mask, seg = row["tokens"], row["targets"], row["mask"], row["segment_ids"]
        for t in range(len(tokens)):
            same_doc_next = t + 1 < len(tokens) and seg[t] != 0 and seg[t + 1] == seg[t]
            assert mask[t] == same_doc_next
            assert targets[t] == (tokens[t + 1] if same_doc_next else TOK.pad_id)


def test_target_bytes_count_the_bytes_of_masked_in_targets():
    for batch in _all_batches(DOCS):
        want = [
            len(TOK.decode_bytes(batch["targets"][r][batch["mask"][r]]))
            for r in range(len(batch["tokens"]))
        ]
        np.testing.assert_array_equal(batch["target_bytes"], want)


def test_resume_from_a_saved_state_continues_exactly():
    def fresh():
        return DataIterator(build_dataset(DOCS, TOK, seq_len=64, batch_size=4, seed=3))

    uninterrupted = fresh()
    expected = [next(uninterrupted) for _ in range(12)]
    it = fresh()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    resumed = fresh()
    resumed.set_state(state)
    for want in expected[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_epochs_are_reshuffled_and_seeds_differ():
    def first_tokens(seed, n):
        it = DataIterator(build_dataset(DOCS, TOK, seq_len=64, batch_size=4, seed=seed))
        return [next(it)["tokens"] for _ in range(n)]

    a, b = first_tokens(0, 3), first_tokens(1, 3)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    np.testing.assert_array_equal(first_tokens(0, 3)[0], a[0])  # deterministic


def _token_counts(docs):
    counts = collections.Counter()
    for doc in docs:
        counts.update([TOK.bos_id, *TOK.encode(doc), TOK.eos_id])
    return counts


def test_two_processes_read_disjoint_shards_that_cover_the_corpus():
    """Process p reads exactly the documents p, p + 2, ...: together all of them, once."""
    for process in range(2):
        got = collections.Counter()
        for row in _rows(_all_batches(DOCS, shard=process, num_shards=2)):
            for seg in _segments(row):
                got.update(seg.tolist())
        assert got == _token_counts(DOCS[process::2])
    assert _token_counts(DOCS[0::2]) + _token_counts(DOCS[1::2]) == _token_counts(DOCS)


@pytest.mark.parametrize("num_streams", [1, 2, 4])
def test_stream_batches_do_not_depend_on_how_processes_split_the_rows(num_streams):
    """The global batch is one batch of each stream (stream s = records s::S), concatenated;
    a process holding any subset of rows (contiguous, interleaved, sharing a stream with another
    process) gets exactly those rows, and the processes' merged states resume the full batch."""
    batch = 8

    def stream(s):
        return build_dataset(
            DOCS, TOK, seq_len=64, batch_size=batch // num_streams, seed=2, shard=s,
            num_shards=num_streams,
        )  # fmt: skip

    alone = [DataIterator(stream(s)) for s in range(num_streams)]
    expected = []
    for _ in range(5):
        parts = [next(it) for it in alone]
        expected.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def iterator(rows):
        return StreamIterator(stream, num_streams, batch, np.asarray(rows), 64)

    for split in ([range(0, 4), range(4, 8)], [range(0, 8, 2), range(1, 8, 2)]):
        its = [iterator(list(rows)) for rows in split]
        for step in range(3):
            for rows, it in zip(split, its, strict=True):
                got = next(it)
                for k in expected[step]:
                    np.testing.assert_array_equal(got[k], expected[step][k][list(rows)])
        resumed = iterator(range(batch))
        resumed.set_state(merge_stream_states([it.get_state() for it in its]))
        for step in (3, 4):
            got = next(resumed)
            for k in expected[step]:
                np.testing.assert_array_equal(got[k], expected[step][k])
    with pytest.raises(ValueError, match=r"saved data position is for 3 data streams"):
        iterator(range(batch)).set_state({"num_streams": 3, "streams": {}})


def test_an_evaluation_epoch_over_streams_holds_every_token_once():
    """Streams of different lengths: exhausted ones give empty rows until all are done."""

    def stream(s):
        return build_dataset(
            DOCS, TOK, seq_len=64, batch_size=2, seed=1, num_epochs=1, drop_remainder=False,
            shard=s, num_shards=3,
        )  # fmt: skip

    got = collections.Counter()
    for batch in StreamIterator(stream, 3, 6, np.arange(6), 64, pad_id=TOK.pad_id):
        assert batch["tokens"].shape == (6, 64)
        for row in _rows([batch]):
            for seg in _segments(row):
                got.update(seg.tolist())
    assert got == _token_counts(DOCS)


def test_global_arrays_split_the_batch_over_the_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    batch = _all_batches(DOCS, batch_size=8)[0]
    arrays = to_global(batch, mesh)
    assert arrays["tokens"].shape == (8, 64)
    assert arrays["tokens"].sharding.shard_shape((8, 64)) == (1, 64)
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), batch["tokens"])


def test_pad_batch_fills_with_empty_rows():
    batch = _all_batches(DOCS)[-1]
    padded = pad_batch({k: v[:1] for k, v in batch.items()}, 4, TOK.pad_id)
    assert padded["tokens"].shape[0] == 4
    assert not padded["mask"][1:].any() and not padded["segment_ids"][1:].any()


def test_batch_size_must_split_over_processes_and_mesh():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    with pytest.raises(
        ValueError, match=r"batch_size=12 is not divisible by the data-parallel size 8"
    ):
        check_batch_size(12, mesh, 1)
    with pytest.raises(ValueError, match=r"batch_size=5 is not divisible by the 2 processes"):
        check_batch_size(5, None, 2)
    assert check_batch_size(16, mesh, 2) == 8


def test_make_iterator_on_local_files_and_its_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("hello world\n" * 40)
    cfg = DataConfig(dataset=str(tmp_path / "*.txt"), seq_len=32, batch_size=8)
    batch = next(make_iterator(cfg, TOK))
    assert batch["tokens"].shape == (8, 32) and batch["mask"].any()
    (tmp_path / "short.txt").write_text("hi")
    short = DataConfig(dataset=str(tmp_path / "short.txt"), seq_len=32, batch_size=8)
    with pytest.raises(ValueError, match=r"holds 3 tokens, fewer than one sequence of seq_len=32"):
        make_iterator(short, TOK)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty: 1 file\(s\) hold no text"):
        make_iterator(DataConfig(dataset=str(tmp_path / "empty.txt")), TOK)
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*missing.txt'"):
        make_iterator(DataConfig(dataset=str(tmp_path / "missing.txt")), TOK)
    with pytest.raises(ValueError, match=r"unknown TFDS dataset 'lm1bb'. Did you mean lm1b"):
        make_iterator(DataConfig(dataset="tfds:lm1bb"), TOK)
    mesh = make_mesh(MeshConfig(fsdp=8))
    with pytest.raises(
        ValueError, match=r"batch_size=4 is not divisible by the data-parallel size 8"
    ):
        make_iterator(DataConfig(dataset=str(tmp_path / "a.txt"), batch_size=4), TOK, mesh=mesh)
    assert jax.process_count() == 1


def test_worker_processes_are_deterministic_and_resume():
    def batches(workers, n, state=None):
        it = DataIterator(
            build_dataset(DOCS, TOK, seq_len=64, batch_size=4, seed=5, worker_count=workers)
        )
        if state is not None:
            it.set_state(state)
        out = [next(it) for _ in range(n)]
        return out, json.loads(json.dumps(it.get_state()))

    # Each worker packs its own share of the documents, so the order differs from the in-process
    # pipeline, but it is deterministic and resumes exactly.
    uninterrupted, _ = batches(2, 6)
    first, state = batches(2, 3)
    resumed, _ = batches(2, 3, state)
    for got, want in zip(first + resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_shuffled_batches_mix_rows_of_many_documents():
    # Ten documents of 40 rows each, one letter per document. Packed in order, a batch of 8 rows
    # would hold one document; the row shuffle draws every batch from the whole window.
    docs = [chr(ord("a") + i) * (64 * 40) for i in range(10)]
    letters = np.asarray([TOK.encode(chr(ord("a") + i))[0] for i in range(10)])

    def docs_per_batch(shuffle):
        it = DataIterator(build_dataset(docs, TOK, seq_len=64, batch_size=8, shuffle=shuffle))
        counts = []
        for _ in range(10):
            tokens = next(it)["tokens"]
            counts.append(len(set(letters[np.isin(letters, tokens)])))
        return counts

    assert max(docs_per_batch(False)) <= 2  # consecutive rows: one document, or two at a seam
    assert min(docs_per_batch(True)) >= 4, docs_per_batch(True)
