"""Tokenizers: exact round trips (property-based), save/load, training errors."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
)

CORPUS = (
    """\
def greet(name: str) -> str:
    return f"Hello, {name}!"  # naïve café, 日本語, Ελληνικά, emoji 🙂

class Point:
    x: int = 0\ty: int = 1
"""
    * 50
)

# Any Unicode text that has no lone surrogates (those cannot be UTF-8 at all), control
# characters, combining marks and astral-plane characters included.
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    # The json package's sources (present with every Python) give enough variety for 320 pieces.
    json_sources = sorted(Path(json.__file__).parent.glob("*.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS + "".join(p.read_text() for p in json_sources))
    return path


@pytest.fixture(scope="module")
def sentencepiece(corpus_file):
    return SentencePieceTokenizer.train([corpus_file], vocab_size=512)


@pytest.fixture(scope="module")
def bpe(corpus_file):
    return HFTokenizer.train_bpe([corpus_file], vocab_size=320)


@given(TEXT)
def test_byte_tokenizer_round_trips_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


@given(st.binary(max_size=100))
def test_byte_tokenizer_keeps_invalid_utf8_bytes(data):
    """Any byte string (invalid UTF-8 included) survives decode → encode unchanged."""
    tok = ByteTokenizer()
    ids = [b + 3 for b in data]
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode_bytes(ids) == data
    shown = tok.decode(ids, errors="replace")  # for display: U+FFFD where bytes are invalid
    assert shown == data.decode("utf-8", errors="replace")


def test_byte_tokenizer_decode_drops_special_and_padding_ids():
    tok = ByteTokenizer()
    assert tok.decode([tok.bos_id, *tok.encode("ok"), tok.eos_id, tok.pad_id, 300]) == "ok"


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_sentencepiece_round_trips_text(sentencepiece, text):
    assert sentencepiece.decode(sentencepiece.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_bpe_round_trips_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("fixture", ["sentencepiece", "bpe"])
def test_trained_tokenizers_compress_and_reserve_special_ids(request, fixture):
    tok = request.getfixturevalue(fixture)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == {"sentencepiece": 512, "bpe": 320}[fixture]
    sample = CORPUS[:500]
    assert len(tok.encode(sample)) < 0.85 * len(sample.encode())  # learned merges, not bytes
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(tok.encode(CORPUS))


@pytest.mark.parametrize("fixture", ["sentencepiece", "bpe"])
def test_text_that_spells_a_special_token_stays_text(request, fixture):
    tok = request.getfixturevalue(fixture)
    text = "<pad><s></s> <|endoftext|>"
    ids = tok.encode(text)
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("fixture", ["sentencepiece", "bpe"])
def test_save_and_load_as_plain_files(request, fixture, tmp_path):
    tok = request.getfixturevalue(fixture)
    tok.save(tmp_path)
    manifest = json.loads((tmp_path / "jaxlm_tokenizer.json").read_text())
    assert manifest["vocab_size"] == tok.vocab_size
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert loaded.encode(CORPUS[:300]) == tok.encode(CORPUS[:300])
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)


def test_load_foreign_files(bpe, sentencepiece, tmp_path):
    bpe._tok.save(str(tmp_path / "tokenizer.json"))  # a bare Hugging Face tokenizer.json
    assert load_tokenizer(tmp_path).encode("x = 1") == bpe.encode("x = 1")
    (tmp_path / "m.model").write_bytes(sentencepiece._proto)  # a bare SentencePiece model
    assert load_tokenizer(tmp_path / "m.model").encode("x = 1") == sentencepiece.encode("x = 1")
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)


def test_bad_tokenizer_inputs_are_refused(corpus_file, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc abc abc\n")
    with pytest.raises(ValueError, match=r"vocab size 1000 does not suit this corpus: .*too high"):
        SentencePieceTokenizer.train([tiny], vocab_size=1000)
    with pytest.raises(ValueError, match=r"vocab size 100 is too small .* at least 261"):
        SentencePieceTokenizer.train([corpus_file], vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab size 200 is too small .* at least 260"):
        HFTokenizer.train_bpe([corpus_file], vocab_size=200)
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*missing\*.txt'"):
        HFTokenizer.train_bpe([str(tmp_path / "missing*.txt")], vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at"):
        load_tokenizer(tmp_path / "nothing")
