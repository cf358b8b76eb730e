"""Text sources: the local-text TFDS builder, the default corpus, TFDS names (mocked, offline)."""

import json
import sys

import pytest
import tensorflow_datasets as tfds

from jaxlm import storage
from jaxlm.data import open_source, stdlib_files
from jaxlm.data.sources import MAX_CHUNK_CHARS, _hash

DOCS = [f"document {i}\n" + "line of text\n" * (i % 7 + 1) for i in range(200)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))


def _write_corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(DOCS[:100]):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(doc)
    with open(tmp_path / "more.jsonl", "w") as f:
        for doc in DOCS[100:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return f"{tmp_path / 'docs'}/*.txt,{tmp_path / 'more.jsonl'}"


def test_local_text_builds_deterministic_hash_splits(tmp_path, capfd):
    spec = _write_corpus(tmp_path)
    train, val = open_source(spec, "train"), open_source(spec, "validation")
    # Built once, said in plain words on stderr (not TFDS's "Downloading and preparing dataset
    # Unknown size" when nothing downloads); stdout stays free for results.
    out, err = capfd.readouterr()
    assert out == "" and "Download" not in err and "Unknown size" not in err
    assert err.count("jaxlm: building the local_text dataset from 101 files") == 1, err
    got_train = sorted(train[i] for i in range(len(train)))
    got_val = sorted(val[i] for i in range(len(val)))
    # Reference: a document is validation iff its content hash is below 5%.
    want_val = sorted(d for d in DOCS if _hash(d) < 0.05)
    assert got_val == want_val and len(want_val) > 0
    assert got_train == sorted(d for d in DOCS if _hash(d) >= 0.05)


def test_a_corpus_in_a_bucket_gives_the_same_splits_as_on_disk(tmp_path, gcs_bucket):
    """gs:// globs and prefixes (the Cloud Storage emulator): the same documents, the same
    hash splits; a glob that matches nothing names itself."""
    _write_corpus(tmp_path)
    storage.upload_dir(tmp_path / "docs", storage.as_path(f"{gcs_bucket}/corpus/docs"))
    (storage.as_path(gcs_bucket) / "corpus" / "more.jsonl").write_bytes(
        (tmp_path / "more.jsonl").read_bytes()
    )
    for spec in (f"{gcs_bucket}/corpus/docs/*.txt,{gcs_bucket}/corpus/more.jsonl",
                 f"files:{gcs_bucket}/corpus"):  # fmt: skip
        train, val = open_source(spec, "train"), open_source(spec, "validation")
        assert sorted(val[i] for i in range(len(val))) == sorted(d for d in DOCS if _hash(d) < 0.05)
        assert sorted(train[i] for i in range(len(train))) == sorted(
            d for d in DOCS if _hash(d) >= 0.05
        )
    with pytest.raises(FileNotFoundError, match=f"no file matches '{gcs_bucket}/nothing/"):
        open_source(f"{gcs_bucket}/nothing/*.txt", "train")
    with pytest.raises(ValueError, match=r"data\.data_dir='gs://.*': a local-text corpus"):
        open_source(f"{gcs_bucket}/corpus", "train", data_dir=f"{gcs_bucket}/built")


def test_a_tfds_dataset_in_a_bucket_reads_like_on_disk(tmp_path, gcs_bucket):
    """A prepared TFDS dataset copied into a bucket (the emulator) is read from there, through
    TFDS's metadata (epath) and array_record's own Cloud Storage reader."""
    text = "".join(f"CITIZEN {i}:\nSpeak, speak.\n\n" for i in range(300))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "input.txt").write_text(text)
    local = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    on_disk = open_source("tfds:tiny_shakespeare", "train", **local)[0]
    version = tmp_path / "tfds" / "tiny_shakespeare" / "1.0.0"
    storage.upload_dir(version, storage.as_path(f"{gcs_bucket}/tfds/tiny_shakespeare/1.0.0"))
    for split in ("train", "validation"):
        remote = open_source("tfds:tiny_shakespeare", split, data_dir=f"{gcs_bucket}/tfds")
        assert remote[0] == open_source("tfds:tiny_shakespeare", split, **local)[0]
    assert remote.description == "tfds:tiny_shakespeare[validation]" and len(on_disk) > 1000


def test_long_documents_are_chunked_at_line_breaks(tmp_path):
    line = "x" * 999 + "\n"
    (tmp_path / "big.txt").write_text(line * 200)  # 200k characters, one document
    (tmp_path / "small.txt").write_text("tiny\n")
    train = open_source(str(tmp_path / "*.txt"), "train")
    val = open_source(str(tmp_path / "*.txt"), "validation")
    chunks = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert (
        all(len(c) <= MAX_CHUNK_CHARS for c in chunks) and len(chunks) >= 200_000 // MAX_CHUNK_CHARS
    )
    assert all(c.endswith("\n") for c in chunks)
    assert sorted("".join(chunks)) == sorted(line * 200 + "tiny\n")


def test_a_single_document_still_gets_both_splits(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    train = open_source(str(tmp_path / "one.txt"), "train")[0]
    val = open_source(str(tmp_path / "one.txt"), "validation")[0]
    assert train + val == (tmp_path / "one.txt").read_text()
    assert val.startswith("line 95\n")


def test_default_corpus_is_this_pythons_stdlib_without_tests():
    files = stdlib_files()
    assert len(files) > 300
    names = {f.name for f in files}
    assert "json" in {f.parent.name for f in files} and "os.py" in names
    assert not any(f.name.startswith("test_") or "test" in f.parent.parts[-1:] for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert f"{sys.version_info.minor}" in open_source("stdlib", "validation").description


@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_tfds_names_read_through_data_source(name):
    with tfds.testing.mock_data(num_examples=6):
        source = open_source(f"tfds:{name}", "train")
        assert len(source) == 6
        assert all(isinstance(source[i], str) for i in range(6))


def test_tiny_shakespeare_builds_offline_from_manual_dir(tmp_path, capfd):
    text = "".join(f"CITIZEN {i}:\nSpeak, speak.\n\n" for i in range(300))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "input.txt").write_text(text)
    kw = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    i = int(len(text) * 0.9)  # TFDS's own 90/5/5 split
    j = i + int((len(text) - i) * 0.5)
    assert open_source("tfds:tiny_shakespeare", "train", **kw)[0] == text[:i]
    assert open_source("tfds:tiny_shakespeare", "validation", **kw)[0] == text[i:j]
    assert open_source("tfds:tiny_shakespeare", "test", **kw)[0] == text[j:]
    out, err = capfd.readouterr()
    assert out == "" and "Download" not in err
    assert err.count("building the tiny_shakespeare dataset from") == 1, err


def test_bad_sources_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"unknown TFDS dataset 'lm1bb'. Did you mean lm1b"):
        open_source("tfds:lm1bb")
    with pytest.raises(ValueError, match=r"unknown TFDS dataset 'c4/en'.* data_dir holds their"):
        open_source("tfds:c4/en", data_dir=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"could not prepare TFDS dataset 'lm1b' .* data_dir="):
        open_source("tfds:lm1b", data_dir=str(tmp_path / "nothing"), download=False)
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: no 'text' field in \['body'\]"):
        open_source(str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match=r"splits 'train' and 'validation', not 'test'"):
        open_source(str(tmp_path / "x.jsonl"), "test")
    with pytest.raises(FileNotFoundError, match=r"has no input.txt for tiny_shakespeare"):
        open_source("tfds:tiny_shakespeare", manual_dir=str(tmp_path))


def test_text_source_accepts_str_and_bytes_records():
    from jaxlm.data.sources import TextSource

    source = TextSource([{"text": b"caf\xc3\xa9"}, {"text": "plain"}], "text", "records")
    assert [source[0], source[1]] == ["café", "plain"]
