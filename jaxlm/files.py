"""Reading the files a user hands jaxlm (JSON, JSONL, text) with errors that name the file and
line and say what the file must hold, instead of a decoder's message about "line 1 column 5".

Every error is a `ValueError` (the CLI prints it on one line and exits 2).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxlm import storage

_KINDS = {dict: "a JSON object", list: "a JSON list"}


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def read_text(path: str | Path) -> str:
    """The file's text; a clear error when it is not UTF-8 text (a binary file, say)."""
    path = storage.as_path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "give text files (convert other encodings to UTF-8 first)"
        ) from None
    if "\0" in text:
        raise ValueError(
            f"{path} looks like a binary file (a NUL byte at offset {text.index(chr(0))}); "
            "give text files"
        )
    return text


def parse_json(text: str, where: str) -> Any:
    """`text` decoded as JSON; errors read "`where`:LINE:COLUMN: not valid JSON (reason)"."""
    if not text.strip():
        raise ValueError(f"{where}: empty, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def read_json(
    path: str | Path, expect: type = dict, keys: Iterable[str] = (), what: str = ""
) -> Any:
    """The JSON value in `path`, which must be of type `expect` (dict or list) and, for a dict,
    hold `keys`. `what` names the file's role in errors ("a run config", ...)."""
    path = storage.as_path(path)
    role = f" ({what})" if what else ""
    value = parse_json(read_text(path), str(path))
    if not isinstance(value, expect):
        raise ValueError(f"{path}{role} must hold {_KINDS[expect]}, but holds {_kind(value)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(
            f"{path}{role} must hold an object with keys {sorted(keys)}; missing {missing}"
        )
    return value


def parse_json_line(line: str, path: str | Path, line_no: int) -> dict[str, Any]:
    """One JSONL line, which must be an object; errors name the file's own line number."""
    where = f"{path}:{line_no}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: each line must be a JSON object, this one is {_kind(value)}")
    return value


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            yield n, parse_json_line(line, path, n)
