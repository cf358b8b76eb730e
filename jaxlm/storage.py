"""Run directories and files that may live on local disk or in a bucket (`gs://bucket/run`).

One path type serves both: `pathlib.Path` on disk, `etils.epath.Path` for a URL (`gs://`, and
whatever else epath reads). Reads, writes and listings go through epath, which uses gcsfs for
Cloud Storage; checkpoint arrays go through TensorStore's own gcs driver (Orbax picks it from
the URL). Credentials are the libraries' own: application default credentials on a Cloud TPU VM
(the VM's service account), `gcloud auth application-default login` elsewhere. jaxlm never reads
or logs them. `STORAGE_EMULATOR_HOST` and `TENSORSTORE_GCS_HTTP_URL` point both clients at an
emulator (the tests do).

What differs in a bucket, and is handled here:

- An object is written whole, so an upload is already atomic (no temporary file + rename), and
  cannot be appended to (`AppendFile` rewrites it, at most every `flush_seconds`).
- A "directory" is a prefix: a rename copies every object under it, then deletes the originals.
- gcsfs caches listings; a listing that must see other writers' objects (TensorStore's, other
  hosts') drops the cache first.
- There is no free-space figure to check.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from etils import epath

    AnyPath = Path | epath.Path
else:
    AnyPath = Path  # annotations only; etils is imported when a URL is first used


def is_remote(path: str | os.PathLike) -> bool:
    """A URL such as `gs://bucket/run` (not a local path)."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike, absolute: bool = False) -> AnyPath:
    """`path` as a `pathlib.Path` (local; made absolute if asked) or an `epath.Path` (a URL)."""
    text = os.fspath(path)
    if is_remote(text):
        if not text.startswith("gs://"):
            # epath reads s3:// and others through fsspec too, but only gs:// is tested here.
            scheme = text.split("://", 1)[0]
            raise ValueError(
                f"{text!r}: {scheme}:// paths are not supported; give a local path or gs://BUCKET/..."
            )
        if importlib.util.find_spec("gcsfs") is None:
            raise ValueError(
                f"{text!r}: gs:// paths need gcsfs; pip install 'jaxlm[gcs]' (or jaxlm[tpu])"
            )
        from etils import epath

        return epath.Path(text)
    return Path(text).absolute() if absolute else Path(text)


def refresh(path: AnyPath) -> None:
    """Drop cached bucket listings, so the next look at `path` sees every writer's objects
    (TensorStore's, other processes'); nothing to do on disk."""
    if is_remote(path):
        _fs(path).invalidate_cache()


def _fs(path: AnyPath) -> Any:
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path))


def write_bytes_atomic(path: AnyPath, data: bytes) -> None:
    """Write `path` so that a kill leaves the old contents or the new, never half of them."""
    if is_remote(path):
        path.write_bytes(data)  # an object upload is all or nothing
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text_atomic(path: AnyPath, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def move_tree(source: AnyPath, target: AnyPath) -> None:
    """Move the directory `source` to `target` (replacing a `target` that exists)."""
    if target.exists():
        rmtree(target)
    if is_remote(source):
        # A server-side copy of each object, then the originals deleted (a bucket has no
        # folders to create first, nor a rename; gcsfs's `mv` tries the move API first, which
        # only some buckets offer, and retries it for seconds per object before copying).
        fs = _fs(source)
        fs.copy(os.fspath(source), os.fspath(target), recursive=True)
        fs.rm(os.fspath(source), recursive=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))


def rmtree(path: AnyPath) -> None:
    if is_remote(path):
        path.rmtree()
    else:
        shutil.rmtree(path)


def size(path: AnyPath) -> int:
    """The file's (object's) size in bytes."""
    return path.stat().length if is_remote(path) else path.stat().st_size


def identity(path: AnyPath) -> str:
    """A string that changes when the file does: its absolute path, size and modification time
    (a bucket object's generation)."""
    if not is_remote(path):
        stat = path.stat()
        return f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    info = _fs(path).info(os.fspath(path))
    return f"{os.fspath(path)}\0{info['size']}\0{info.get('generation') or info.get('mtime')}"


def expand_remote(pattern: str) -> list[AnyPath]:
    """The objects under a bucket prefix (recursively) or matching a glob (`*`, `**`), sorted."""
    fs = _fs(pattern)
    scheme = pattern.split("://", 1)[0] + "://"
    if fs.isdir(pattern):
        names = fs.find(pattern)
    else:
        names = [n for n, info in fs.glob(pattern, detail=True).items() if info["type"] == "file"]
    return [as_path(scheme + n) for n in sorted(names) if not n.endswith("/")]


def upload_file(local: Path, target: AnyPath) -> None:
    """Copy the local file `local` to `target` (one object upload: all or nothing)."""
    _fs(target).put_file(str(local), os.fspath(target))


def upload_dir(local: Path, target: AnyPath) -> None:
    """Copy the files of the local directory `local` (not recursive) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for p in sorted(local.iterdir()):
        if p.is_file():
            write_bytes_atomic(target / p.name, p.read_bytes())


_COPIES: dict[str, Path] = {}


def cached_copy(path: AnyPath) -> Path:
    """A local copy of the bucket object `path`, downloaded once per process and version of the
    object (streamed to disk, not held in memory), removed when the process exits."""
    key = identity(path)
    if key not in _COPIES or not _COPIES[key].exists():
        local = Path(tempfile.mkdtemp(prefix="jaxlm-")) / path.name
        atexit.register(shutil.rmtree, local.parent, ignore_errors=True)
        _fs(path).get_file(os.fspath(path), str(local))
        _COPIES[key] = local
    return _COPIES[key]


def local_copy(path: str | os.PathLike) -> Path:
    """`path` itself when it is local; for a URL, a local copy of the file, or of the files of
    the directory (not recursive), for libraries that read only local files. The copy lasts as
    long as the process (a loaded tokenizer may read its files again to save them)."""
    if not is_remote(path):
        return Path(path)
    source = as_path(path)
    local = Path(tempfile.mkdtemp(prefix="jaxlm-")) / source.name
    atexit.register(shutil.rmtree, local.parent, ignore_errors=True)
    if source.is_dir():
        local.mkdir()
        for p in source.iterdir():
            if p.is_file():
                (local / p.name).write_bytes(p.read_bytes())
    elif source.is_file():
        local.write_bytes(source.read_bytes())
    else:
        raise FileNotFoundError(f"{os.fspath(path)!r} does not exist")
    return local


class AppendFile:
    """A text file appended to line by line: flushed after each line on disk; in a bucket (no
    appends), kept in memory and the whole object rewritten at most every `flush_seconds` and at
    `close` (lines written since the last upload are lost if the process is killed; a resumed
    run writes them again)."""

    def __init__(self, path: AnyPath, flush_seconds: float = 30.0) -> None:
        self._path = path
        self._remote = is_remote(path)
        self._flush_seconds = flush_seconds
        if self._remote:
            self._text = path.read_text() if path.exists() else ""
            self._uploaded = time.monotonic()
            self._dirty = False
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")  # noqa: SIM115

    def write(self, line: str) -> None:
        if not self._remote:
            self._file.write(line)
            self._file.flush()
            return
        self._text += line
        self._dirty = True
        if time.monotonic() - self._uploaded >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            self._path.write_text(self._text)
            self._uploaded = time.monotonic()
            self._dirty = False

    def close(self) -> None:
        if self._remote:
            self.flush()
        else:
            self._file.close()
