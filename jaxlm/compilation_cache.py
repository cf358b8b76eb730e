"""JAX's persistent compilation cache, on by default for the CLI.

XLA compiles every jitted program (parameter init, train step, eval step, sampler) at the start
of each process: seconds on a CPU, minutes for a large model on a TPU pod. The same run resumed
after a preemption, `jaxlm sample`/`eval` on a run, or the runs of a sweep that share shapes
compile the same programs again. With the cache, XLA's executables are written to disk once and
read back by later processes (JAX keys each entry by the program, the devices, the compile
options and the jax/jaxlib versions, so a hit is always the same executable).

`jaxlm` commands call `enable()`. The directory is `$JAXLM_XLA_CACHE`, else JAX's own setting
(`JAX_COMPILATION_CACHE_DIR` / `jax_compilation_cache_dir`) if the user made one, else
`<jaxlm cache>/xla` (`$JAXLM_CACHE`, default ~/.cache/jaxlm). `JAXLM_XLA_CACHE=off` turns it off.
Python users opt in with `jaxlm.compilation_cache.enable()`. `return_free_heap()` gives back to
the system the heap that compiling freed and glibc keeps (the loop calls it).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import tempfile

import jax

from jaxlm.data.sources import cache_dir

ENV = "JAXLM_XLA_CACHE"
OFF = ("off", "0", "false", "no", "none")
# Programs that compile faster than this are not worth a file (JAX's default is 1 s, which
# leaves out the eval step and sampler of a small model).
MIN_COMPILE_SECONDS = 0.2
# Least recently used entries are evicted past this size (a large TPU executable is 100s of MB)
# where the `filelock` package is installed (JAX's eviction needs it); else the cache is unbounded,
# as JAX's own default is.
MAX_BYTES = 4 << 30


def enable(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent compilation cache on (at `path`, or as the module docstring says)
    and return its directory; None when it is turned off, or when a local directory cannot be
    created or written (said on stderr, naming it). Call before the first compile."""
    setting = os.environ.get(ENV, "")
    if path is None and setting.lower() in OFF:
        return None
    directory = path or setting or jax.config.jax_compilation_cache_dir or str(cache_dir() / "xla")
    directory = os.fspath(directory)
    if "://" not in directory:  # a local directory: usable, or said once and left off
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            print(
                f"note: the XLA compilation cache {directory!r} cannot be written ({e}); "
                f"compiling without it (set ${ENV} to a writable directory, or to 'off')",
                file=sys.stderr,
            )
            return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if importlib.util.find_spec("filelock") is not None:  # JAX's eviction needs file locks
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory


def return_free_heap() -> bool:
    """Give the heap that XLA's compiles freed back to the system (glibc's `malloc_trim`).

    Compiling the first sizeable program of a process takes about 0.2 GB of heap for the CPU
    backend's code generation; glibc keeps what is freed for later allocations, so the process's
    resident memory stays that much higher for the rest of the run (and later allocations add
    to it). The loop calls this after its first step, after each evaluation and before its
    closing sample: the default job's peak went from 0.78-0.86 to 0.74-0.75 GB. False where the
    C library has no `malloc_trim` (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
