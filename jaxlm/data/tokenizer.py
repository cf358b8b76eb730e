"""Tokenizers behind one small protocol: byte-level (default), SentencePiece, Hugging Face BPE.

Every tokenizer saves to a directory as plain files: `jaxlm_tokenizer.json` (kind and special ids)
next to the model file (`spm.model` or `tokenizer.json`). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jaxlm import storage
from jaxlm.files import read_json, read_text

MANIFEST = "jaxlm_tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in every tokenizer jaxlm trains


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, sampling and evaluation need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _write_manifest(directory: str | os.PathLike, kind: str, tok: Tokenizer, **extra: Any) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    manifest = {
        "kind": kind,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        **extra,
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (ids 0, 1, 2 = pad, bos, eos): 259 ids, no training, exact.

    Masked LM uses id 259 (`mask_id`, one past the bytes) as its [MASK] token, so a masked-LM
    model on bytes needs model.vocab_size >= 260 (the byte presets have 320).

    `encode` uses the "surrogateescape" error handler, and so does `decode`: a byte sequence that is
    not valid UTF-8 decodes to lone surrogates U+DC80..U+DCFF and encodes back to the same bytes,
    so decode → encode is exact for any ids and encode → decode for any text. Use
    `decode(ids, errors="replace")` for display. Special ids and ids past 258 (a model's vocab may
    be padded) are dropped by `decode`.
    """

    offset = 3
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 256 + offset
    mask_id = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8", errors="surrogateescape")]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)

    def decode(self, ids: Sequence[int], errors: str = "surrogateescape") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def save(self, directory: str | os.PathLike) -> None:
        _write_manifest(directory, "byte", self)


def _expand(inputs: Iterable[str | os.PathLike]) -> list[str]:
    # The same file/directory/glob rules as local corpora (imported here: it loads TFDS).
    from jaxlm.data.sources import expand_inputs

    files = expand_inputs(list(inputs))
    if not any(read_text(f).strip() for f in files):  # read_text: UTF-8 text, or a clear error
        raise ValueError(f"no text in the input ({len(files)} file(s), all empty or blank)")
    return [str(storage.local_copy(p)) for p in files]  # the trainers read local files


def _check_vocab(vocab_size: int, minimum: int, kind: str) -> None:
    if vocab_size < minimum:
        raise ValueError(
            f"vocab size {vocab_size} is too small for a {kind} tokenizer: it needs at least "
            f"{minimum} ids (3 special tokens + 256 byte tokens + at least one merge)"
        )


_SPACE_MARK = "\u2581"


class SentencePieceTokenizer:
    """A SentencePiece model; trained by jaxlm with settings that round-trip text exactly."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    @classmethod
    def train(
        cls,
        inputs: Iterable[str | os.PathLike],
        vocab_size: int,
        model_type: str = "unigram",
        max_sentences: int = 2_000_000,
    ) -> SentencePieceTokenizer:
        """Train on text files: identity normalisation, byte fallback, no dummy prefix."""
        import io

        import sentencepiece as spm

        _check_vocab(vocab_size, 260 + 1, "SentencePiece")  # + unk
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                input=_expand(inputs),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                normalization_rule_name="identity",
                byte_fallback=True,
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_by_whitespace=True,
                allow_whitespace_only_pieces=True,
                # Rare characters need no piece of their own: byte fallback covers them.
                character_coverage=0.9995,
                pad_id=0,
                bos_id=1,
                eos_id=2,
                unk_id=3,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=1 << 16,
                minloglevel=2,
            )
        except RuntimeError as e:
            if "Vocabulary size" in str(e):
                raise ValueError(
                    f"vocab size {vocab_size} does not suit this corpus: {e}"
                ) from None
            raise
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        # SentencePiece writes spaces as "▁" (U+2581), so a literal "▁" would decode as a space.
        # Encode literal ones as their byte-fallback pieces, which decode back to "▁" itself.
        if _SPACE_MARK not in text:
            return self._sp.encode(text, out_type=int)
        mark = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode()]
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                ids += mark
            ids += self._sp.encode(part, out_type=int)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode(
            [int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self.vocab_size]
        )

    def save(self, directory: str | os.PathLike) -> None:
        path = _write_manifest(directory, "sentencepiece", self, file="spm.model")
        (path / "spm.model").write_bytes(self._proto)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (e.g. a byte-level BPE or a `tokenizer.json`)."""

    def __init__(
        self,
        tokenizer,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tok = tokenizer
        self._template_tok = None
        # A Hugging Face `chat_template` (Jinja) and the special-token strings it refers to
        # (`bos_token`, `eos_token`, ...), from `tokenizer_config.json`.
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        # Text that spells a special token ("<pad>", "<|endoftext|>") is encoded as plain text,
        # never as the special id: data cannot inject control tokens.
        self._tok.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

        def find(*names: str) -> int:
            for name in names:
                if name.endswith("_token"):  # the string tokenizer_config.json names
                    name = self.special_tokens.get(name, "")
                i = tokenizer.token_to_id(name)
                if i is not None:
                    return i
            return -1

        # An encoder's [CLS] and [SEP] play the parts of bos and eos (BERT: "[CLS] text [SEP]").
        self.bos_id = (
            find("bos_token", "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
            if bos_id is None
            else bos_id
        )
        if self.bos_id < 0:
            self.bos_id = find("cls_token", "[CLS]")
        self.eos_id = (
            find("eos_token", "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
            if eos_id is None
            else eos_id
        )
        if self.eos_id < 0:
            self.eos_id = find("sep_token", "[SEP]")
        self.pad_id = (
            find("pad_token", "<pad>", "<|pad|>", "[PAD]", "<|endoftext|>")
            if pad_id is None
            else pad_id
        )
        if self.pad_id < 0:
            self.pad_id = self.eos_id
        # The masked-LM [MASK] token, or -1 when the tokenizer has none.
        self.mask_id = find("mask_token", "[MASK]", "<mask>")

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> HFTokenizer:
        """From a `tokenizer.json`; a `tokenizer_config.json` beside it gives the chat template
        and special-token strings unless `kwargs` does."""
        from tokenizers import Tokenizer as HFTok

        if "chat_template" not in kwargs:
            kwargs.update(_hf_chat_settings(Path(path).parent))
        return cls(HFTok.from_file(str(path)), **kwargs)

    @classmethod
    def train_bpe(cls, inputs: Iterable[str | os.PathLike], vocab_size: int) -> HFTokenizer:
        """Train a byte-level BPE (GPT-2 style pre-tokenisation, no prefix space)."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        _check_vocab(vocab_size, 260, "byte-level BPE")
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(_expand(inputs), trainer)
        if tok.get_vocab_size() <= 259:
            raise ValueError(
                f"the input is too short to learn any merge ({tok.get_vocab_size()} ids: only "
                "the special and byte tokens); give more text"
            )
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_template(self, text: str) -> Any:
        """The `tokenizers` Encoding of text a chat template wrote: special-token strings in it
        become their ids (unlike `encode`, where data cannot inject them)."""
        if self._template_tok is None:  # a copy: `encode` stays safe in other threads
            from tokenizers import Tokenizer as HFTok

            self._template_tok = HFTok.from_str(self._tok.to_str())
            self._template_tok.encode_special_tokens = False
        return self._template_tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(valid, skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        extra: dict[str, Any] = {"file": "tokenizer.json"}
        if self.chat_template:
            extra |= {"chat_template": self.chat_template, "special_tokens": self.special_tokens}
        path = _write_manifest(directory, "hf", self, **extra)
        self._tok.save(str(path / "tokenizer.json"))


def _hf_chat_settings(directory: Path) -> dict[str, Any]:
    """chat_template and special-token strings of a Hugging Face tokenizer directory
    (`tokenizer_config.json`, and `chat_template.jinja` where newer transformers put it)."""
    path = directory / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[key] = value
    return {"chat_template": template, "special_tokens": specials}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a directory `save` wrote, a `tokenizer.json` or a SentencePiece `.model`
    (on disk or in a bucket: gs://...)."""
    path = storage.local_copy(path) if storage.is_remote(path) else Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_json(path / MANIFEST, keys=["kind"], what="a jaxlm tokenizer")
        kind = manifest.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "sentencepiece":
            return SentencePieceTokenizer.load(path / manifest["file"])
        if kind == "hf":
            kwargs = {k: manifest[k] for k in ("pad_id", "bos_id", "eos_id")}
            kwargs["chat_template"] = manifest.get("chat_template")
            kwargs["special_tokens"] = manifest.get("special_tokens")
            return HFTokenizer.load(path / manifest["file"], **kwargs)
        raise ValueError(f"{path / MANIFEST}: unknown tokenizer kind {kind!r}")
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return HFTokenizer.load(path / "tokenizer.json")
    if path.is_dir() and (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer.load(path / "tokenizer.model")
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer.load(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    raise FileNotFoundError(
        f"no tokenizer at {str(path)!r}: expected a directory with {MANIFEST}, tokenizer.json or "
        "tokenizer.model, or a tokenizer.json / .model file"
    )


def make_tokenizer(spec: str) -> Tokenizer:
    """ "byte" for the byte tokenizer, otherwise a path for `load_tokenizer`."""
    return ByteTokenizer() if spec == "byte" else load_tokenizer(spec)
