"""Safetensors files without torch: memory-mapped reading and streaming writing.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian bytes. Reading maps the file and hands
out NumPy views (bfloat16 and float8 through `ml_dtypes`), so a slice of a tensor reads only
its own pages; writing takes the shapes up front and the tensors one at a time, so a model is
never held whole in memory.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxlm import storage
from jaxlm.files import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The safetensors name ("BF16", "F32", ...) of a NumPy/JAX dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent; use one of {list(DTYPES)}")
    return _NAMES[dtype]


class SafetensorsFile:
    """One `.safetensors` file, memory-mapped: `names()`, `shape(n)`, `dtype(n)`, `view(n)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = storage.as_path(path)
        size = storage.size(self.path)
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + length
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry['dtype']!r}, which jaxlm "
                    f"cannot read; supported: {list(DTYPES)}"
                )
            dtype, shape = DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                raise ValueError(
                    f"{self.path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} "
                    f"does not fit its byte range [{begin}, {end}) (truncated or corrupt file?)"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._map: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def view(self, name: str) -> np.ndarray:
        """A read-only array backed by the file (nothing is read until it is indexed)."""
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        if self._map is None:
            # A file in a bucket is copied to local disk once (streamed; its header was read
            # by range and checked first), then mapped like any other.
            local = storage.cached_copy(self.path) if storage.is_remote(self.path) else self.path
            self._map = np.memmap(local, dtype=np.uint8, mode="r")
        raw = self._map[self._start + begin : self._start + end]
        return raw.view(dtype).reshape(shape)


class SafetensorsDir:
    """All tensors of a model directory: `model.safetensors`, or the shards its
    `model.safetensors.index.json` lists, or else every `*.safetensors` file in it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = storage.as_path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = read_json(index, keys=["weight_map"])["weight_map"]
            names = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            names = [SINGLE_FILE]
        else:
            names = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not names:
            raise FileNotFoundError(f"no *.safetensors files in {str(self.directory)!r}")
        self._files = {}
        for name in names:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{index} lists {name!r}, which does not exist")
            self._files[name] = SafetensorsFile(path)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self._files.values():
            for key in f.names():
                if key in self._where:
                    raise ValueError(
                        f"tensor {key!r} is in both {self._where[key].path.name} and {f.path.name}"
                    )
                self._where[key] = f

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def view(self, name: str) -> np.ndarray:
        return self._where[name].view(name)


def _header(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: Mapping[str, str]):
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # keep the tensor bytes 8-byte aligned
    return struct.pack("<Q", len(data)) + data


def write_file(
    path: str | Path,
    specs: Sequence[tuple[str, tuple[int, ...], Any]],
    tensors: Iterable[np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` (in the order of `specs` = (name, shape, dtype)) as one safetensors file
    (into a bucket: written locally first, then uploaded as one object)."""
    path = storage.as_path(path)
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="jaxlm-") as tmp:
            local = Path(tmp) / path.name
            write_file(local, specs, tensors, metadata)
            storage.upload_file(local, path)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(specs, metadata or {"format": "pt"}))
        for (name, shape, dtype), x in zip(specs, tensors, strict=True):
            x = np.asarray(x)
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise ValueError(
                    f"tensor {name!r}: expected {tuple(shape)} {np.dtype(dtype)}, got "
                    f"{x.shape} {x.dtype}"
                )
            # Native order is little-endian on every platform JAX supports.
            np.ascontiguousarray(x).reshape(-1).view(np.uint8).tofile(f)
    tmp.replace(path)


def shard_specs(
    specs: Sequence[tuple[str, tuple[int, ...], Any]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], Any]]]:
    """Split `specs` in order into groups of at most `max_shard_bytes` (a larger tensor alone)."""
    groups: list[list[tuple[str, tuple[int, ...], Any]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * np.dtype(spec[2]).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    return groups


def write_dir(
    directory: str | Path,
    specs: Sequence[tuple[str, tuple[int, ...], Any]],
    read: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write tensors `read(name)` for every spec as `model.safetensors`, or as numbered shards
    plus `model.safetensors.index.json` when they exceed `max_shard_bytes`. Returns the files."""
    directory = storage.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups = shard_specs(specs, max_shard_bytes)
    if len(groups) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups, strict=True):
        write_file(directory / name, group, _reads(group, read))
        for spec in group:
            weight_map[spec[0]] = name
            total += math.prod(spec[1]) * np.dtype(spec[2]).itemsize
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        storage.write_text_atomic(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def _reads(group: Sequence[tuple[str, Any, Any]], read: Callable[[str], np.ndarray]) -> Iterator:
    for name, _, _ in group:
        yield read(name)
