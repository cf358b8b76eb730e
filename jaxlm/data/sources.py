"""Random-access text sources: TFDS datasets (array_record), local files, the default corpus.

Every source is prepared once as an array_record TFDS dataset and read with random access
(`tfds.data_source` / `as_data_source`), which is what Grain shuffles, shards and resumes over.
No TensorFlow is needed: TFDS reads and writes array_record files without it.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxlm import storage
from jaxlm.files import parse_json_line, read_text

# Preparing a local corpus takes a second; TFDS's progress bars would only clutter the run's log.
tfds.disable_progress_bar()

DEFAULT_CORPUS = "stdlib"
# Long documents are stored as records of at most this many characters, so that shuffled
# records (and the row shuffle after packing) mix many places of the corpus into every batch.
MAX_CHUNK_CHARS = 16 * 1024
# `text_key` for whole records: each `.jsonl` line is kept as its JSON text (chat data).
RECORD_KEY = "*"
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def cache_dir() -> Path:
    """Where prepared datasets live: $JAXLM_CACHE, or $XDG_CACHE_HOME/jaxlm, or ~/.cache/jaxlm."""
    if os.environ.get("JAXLM_CACHE"):
        return Path(os.environ["JAXLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxlm"


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files: no tests, no generated tables.

    Test suites are excluded, and so are the generated character-mapping codecs in `encodings/`
    (hundred-line hex tables that are not Python anyone writes).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    # os.walk, pruning excluded directories before descending: an interpreter's lib/ may hold
    # tens of thousands of installed files under site-packages.
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _TEST_DIRS]
        found += [Path(top, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    files = []
    for path in sorted(found):
        if "encodings" in path.relative_to(root).parts[:-1]:
            with path.open(encoding="utf-8", errors="replace") as f:
                if "Character Mapping Codec" in f.readline():
                    continue
        files.append(path)
    return files


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[storage.AnyPath]:
    """Files named by paths, directories (recursively) or globs, on disk or in a bucket
    (gs://BUCKET/prefix, gs://BUCKET/**/*.txt); a clear error when none match."""
    files: list[storage.AnyPath] = []
    for item in inputs:
        item = str(item)
        if storage.is_remote(item):
            storage.as_path(item)  # a clear error for unsupported schemes
            found = storage.expand_remote(item)
        elif os.path.isdir(item):
            found = sorted(p for p in Path(item).rglob("*") if p.is_file())
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no file matches {item!r}")
        files += found
    return files


def _documents(path: Path, text_key: str) -> Iterator[tuple[str, str]]:
    """(where: "file:line" or the file, text) of each document of a local file."""
    if path.suffix == ".jsonl":
        text = read_text(path)
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and text_key == RECORD_KEY:
                parse_json_line(line, path, n)  # whole records: checked as JSON objects here
                yield f"{path}:{n}", line.strip()
            elif line.strip():
                record = parse_json_line(line, path, n)
                if text_key not in record:
                    raise ValueError(f"{path}:{n}: no {text_key!r} field in {sorted(record)}")
                if not isinstance(record[text_key], str):
                    raise ValueError(
                        f"{path}:{n}: the {text_key!r} field must be a string, got "
                        f"{type(record[text_key]).__name__}"
                    )
                yield f"{path}:{n}", record[text_key]
    else:
        yield str(path), read_text(path)


def _chunks(text: str, limit: int) -> Iterator[str]:
    """Pieces of at most `limit` characters, cut after a newline where there is one."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or limit
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _hash(text: str) -> float:
    """A uniform number in [0, 1) from the document's content (its split never changes)."""
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local text files as an array_record TFDS dataset with train/validation splits.

    `.jsonl` files give one document per line (field `text_key`); any other file is one document.
    A document goes to validation when the hash of its text falls below `validation_percent`
    (deterministic and stable under reordering or adding files), and is stored as chunks of at
    most `MAX_CHUNK_CHARS` (16k) characters.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        files: Sequence[storage.AnyPath],
        validation_percent: float = 5.0,
        text_key: str = "text",
        **kwargs: Any,
    ) -> None:
        self._files = list(files)
        self._validation_percent = validation_percent
        self._text_key = text_key
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text()}
        if self._text_key == RECORD_KEY:  # where each record came from, for error messages
            features["where"] = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        # First pass: which documents go to validation. Both splits must be non-empty, so a
        # corpus whose hashes put everything on one side moves one document across, and a
        # single-document corpus gives the last ~5% of its lines to validation.
        keys = {}
        for i, path in enumerate(self._files):
            for j, (_, doc) in enumerate(_documents(path, self._text_key)):
                if doc:
                    keys[(i, j)] = _hash(doc)
        if not keys:
            raise ValueError(f"the corpus is empty: {len(self._files)} file(s) hold no text")
        threshold = self._validation_percent / 100
        validation = {k for k, h in keys.items() if h < threshold}
        cut = None
        if len(keys) == 1:
            validation, cut = set(), next(iter(keys))
        elif not validation:
            validation = {min(keys, key=keys.get)}
        elif len(validation) == len(keys):
            validation.discard(max(keys, key=keys.get))
        return {
            "train": self._generate_examples(validation, cut, want_validation=False),
            "validation": self._generate_examples(validation, cut, want_validation=True),
        }

    def _generate_examples(
        self, validation: set, cut: tuple | None, want_validation: bool
    ) -> Iterator[tuple[str, dict[str, str]]]:
        for i, path in enumerate(self._files):
            for j, (where, doc) in enumerate(_documents(path, self._text_key)):
                if not doc:
                    continue
                if (i, j) == cut:
                    head, tail = _split_tail(doc, self._validation_percent)
                    doc = tail if want_validation else head
                elif ((i, j) in validation) != want_validation:
                    continue
                if self._text_key == RECORD_KEY:  # whole records stay whole
                    yield f"{i}-{j}-0", {"text": doc, "where": where}
                    continue
                for k, chunk in enumerate(_chunks(doc, MAX_CHUNK_CHARS)):  # long text: chunks
                    yield f"{i}-{j}-{k}", {"text": chunk}


def _split_tail(text: str, percent: float) -> tuple[str, str]:
    """(head, tail) with the tail about `percent`% of the text, cut after a newline if possible."""
    at = max(1, min(len(text) - 1, round(len(text) * (1 - percent / 100))))
    newline = text.rfind("\n", 0, at) + 1
    at = newline if 0 < newline < len(text) else at
    return text[:at], text[at:]


# Bump when the prepared format or the split rule changes, so old caches are not reused.
_FORMAT_VERSION = 4


def _fingerprint(files: Sequence[storage.AnyPath], **settings: Any) -> str:
    settings = {**settings, "format": _FORMAT_VERSION}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(f"{storage.identity(f)}\n".encode())
    return h.hexdigest()[:16]


def prepare_local_text(
    files: Sequence[storage.AnyPath],
    data_dir: str | os.PathLike | None = None,
    validation_percent: float = 5.0,
    text_key: str = "text",
) -> LocalText:
    """Build (once; reused while the files are unchanged) and return the local-text dataset."""
    if not files:
        raise ValueError("the corpus is empty: no input files")
    if not 0 < validation_percent < 100:
        raise ValueError(f"validation_percent={validation_percent} must be in (0, 100)")
    key = _fingerprint(files, validation_percent=validation_percent, text_key=text_key)
    root = Path(data_dir) if data_dir else cache_dir() / "datasets" / f"local-{key}"
    builder = LocalText(
        files=files, validation_percent=validation_percent, text_key=text_key, data_dir=str(root)
    )
    size = sum(storage.size(f) for f in files)
    _prepare_local(builder, f"{len(files):,} files ({size / 1e6:.1f} MB)")
    return builder


def _prepare_local(builder: Any, source: str) -> None:
    """Build a dataset of local files once, saying so in these words on stderr: TFDS's own
    lines speak of "Downloading and preparing dataset Unknown size" where nothing downloads."""
    if (Path(builder.data_dir) / "dataset_info.json").is_file():  # what TFDS reads back
        return
    print(
        f"jaxlm: building the {builder.name} dataset from {source} into {builder.data_dir} "
        "(once: reused while its files are unchanged)",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()


def _text_of(record: Any, key: str) -> str:
    value = record[key]
    return value.decode("utf-8", errors="surrogateescape") if isinstance(value, bytes) else value


class TextSource:
    """A random-access sequence of strings over a TFDS data source (`len` and `[i]`)."""

    def __init__(self, data_source: Sequence[Any], text_key: str, description: str) -> None:
        self._source = data_source
        self._key = text_key
        self.description = description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return _text_of(self._source[index], self._key)

    def __repr__(self) -> str:
        return f"TextSource({self.description}, {len(self)} records)"

    def where(self, index: int) -> str:
        """Where record `index` came from ("file.jsonl:LINE" for local files), for errors."""
        record = self._source[index]
        if isinstance(record, dict) and "where" in record:
            return _text_of(record, "where")
        return f"{self!r} record {index}"


def _plain(x: Any) -> Any:
    """A decoded TFDS value as JSON types (bytes as text, arrays as lists)."""
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="surrogateescape")
    if isinstance(x, np.ndarray):
        return _plain(x.tolist()) if x.ndim else _plain(x.item())
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class RecordSource(TextSource):
    """Whole TFDS records as JSON text (what chat data reads); a `Sequence` of role/content
    dicts, which TFDS decodes as a dict of lists, becomes a list of messages again."""

    def __init__(self, data_source: Sequence[Any], description: str) -> None:
        super().__init__(data_source, RECORD_KEY, description)

    def __getitem__(self, index: int) -> str:
        record = _plain(dict(self._source[index]))
        messages = record.get("messages")
        if isinstance(messages, dict):
            keys = list(messages)
            record["messages"] = [
                dict(zip(keys, values, strict=True))
                for values in zip(*messages.values(), strict=True)
            ]
        return json.dumps(record)


def record_where(source: Sequence[Any], index: int) -> str:
    """How errors name record `index` of `source`: its file and line where known."""
    where = getattr(source, "where", None)
    return where(index) if where is not None else f"{source!r} record {index}"


def _tiny_shakespeare_offline(manual_dir: str, data_dir: str | None) -> None:
    """Prepare TFDS's `tiny_shakespeare` from a local `input.txt`, exactly as TFDS would.

    TFDS's own builder downloads the file and reads it through TensorFlow; this writes the same
    dataset (one record per split, TFDS's 90/5/5 character split) with neither.
    """
    raw = Path(manual_dir) / "input.txt"
    if not raw.is_file():
        raise FileNotFoundError(f"manual_dir={manual_dir!r} has no input.txt for tiny_shakespeare")
    root = data_dir or tfds.core.constants.DATA_DIR
    if (Path(root) / "tiny_shakespeare" / "1.0.0" / "dataset_info.json").is_file():
        return
    text = raw.read_text()
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5)
    splits = {"train": train, "validation": rest[:j], "test": rest[j:]}

    with tfds.core.registered.skip_registration():

        class TinyShakespeare(tfds.core.GeneratorBasedBuilder):
            name = "tiny_shakespeare"
            VERSION = tfds.core.Version("1.0.0")

            def _info(self) -> tfds.core.DatasetInfo:
                features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
                return {k: self._generate_examples(k, v) for k, v in splits.items()}

            def _generate_examples(self, key: str, split_text: str) -> Iterator[Any]:
                yield key, {"text": split_text}

        builder = TinyShakespeare(data_dir=root, file_format="array_record")
        _prepare_local(builder, f"{raw} ({len(text.encode()) / 1e6:.1f} MB)")


def _tfds_source(
    name: str,
    split: str,
    data_dir: str | None,
    manual_dir: str | None,
    text_key: str | None,
    download: bool,
) -> TextSource:
    if name == "tiny_shakespeare" and manual_dir:
        _tiny_shakespeare_offline(manual_dir, data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    prepare_kwargs = {"download_config": download_config} if download_config else {}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            source = tfds.data_source(
                name,
                split=split,
                data_dir=data_dir,
                download=download,
                builder_kwargs={"file_format": "array_record"},
                download_and_prepare_kwargs=prepare_kwargs,
            )
    except tfds.core.registered.DatasetNotFoundError:
        known = sorted(set(tfds.list_builders(with_community_datasets=False)))
        close = difflib.get_close_matches(name.split("/")[0], known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown TFDS dataset {name!r}.{hint} (Builders that need TensorFlow, such as c4, "
            "are found only when data_dir holds their prepared array_record files.)"
        ) from None
    except Exception as e:  # TFDS raises many kinds; say which dataset and what to do
        raise ValueError(
            f"could not prepare TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: "
            f"{type(e).__name__}: {e}. Prepare it where there is network access (or pass "
            "manual_dir with the raw files) and point data_dir at it."
        ) from None
    features = source.dataset_info.features
    if text_key == RECORD_KEY:
        if "messages" not in features and not {"prompt", "completion"} <= set(features):
            raise ValueError(
                f"TFDS dataset {name!r} has no 'messages' (or 'prompt' + 'completion') feature "
                f"for chat records: {list(features)}"
            )
        return RecordSource(source, f"tfds:{name}[{split}]")
    if text_key is None:
        texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
        if not texts:
            raise ValueError(f"TFDS dataset {name!r} has no text feature: {list(features)}")
        text_key = "text" if "text" in texts else texts[0]
    elif text_key not in features:
        raise ValueError(f"TFDS dataset {name!r} has no feature {text_key!r}: {list(features)}")
    return TextSource(source, text_key, f"tfds:{name}[{split}]")


def open_source(
    dataset: str = DEFAULT_CORPUS,
    split: str = "train",
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    text_key: str | None = None,
    download: bool = True,
) -> TextSource:
    """A text source by name.

    `dataset` is "stdlib" (the default corpus: this Python's standard library sources),
    "tfds:NAME" (any TFDS dataset with a text feature, e.g. tfds:lm1b, tfds:c4/en), or
    comma-separated local paths/globs ("files:data/*.txt,more.jsonl" or just "data/*.txt").
    Local corpora have splits "train" and "validation". With `download=False` a TFDS dataset
    that is not prepared in `data_dir` is an immediate error instead of a download attempt.
    Local-text files and a TFDS `data_dir` may be in a bucket (gs://...).
    """
    if dataset.startswith("tfds:"):
        return _tfds_source(dataset[5:], split, data_dir, manual_dir, text_key, download)
    if dataset == DEFAULT_CORPUS:
        files = stdlib_files()
        description = f"stdlib (Python {sys.version_info.major}.{sys.version_info.minor})"
    else:
        spec = dataset[6:] if dataset.startswith("files:") else dataset
        files = expand_inputs([s for s in spec.split(",") if s])
        description = spec
    if split not in ("train", "validation"):
        raise ValueError(f"local corpora have splits 'train' and 'validation', not {split!r}")
    if data_dir is not None and storage.is_remote(data_dir):
        raise ValueError(
            f"data.data_dir={str(data_dir)!r}: a local-text corpus ({description}) is built on "
            "each host's own disk; leave data.data_dir unset (the files themselves may be in a "
            "bucket), or give a local directory"
        )
    builder = prepare_local_text(files, data_dir, text_key=text_key or "text")
    return TextSource(builder.as_data_source(split=split), "text", f"{description}[{split}]")
