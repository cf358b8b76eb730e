"""Test setup: 8 fake CPU devices (set before jax is imported) and strict rank promotion."""

import os
from importlib.metadata import version

_FLAGS = ["--xla_force_host_platform_device_count=8"]
# The 8 fake devices' threads meet at every collective. On 2 cores shared by two test workers and
# the CLI processes they start, one device's thread can arrive later than XLA:CPU's default
# termination timeout, which then aborts the whole process ("Termination timeout for `all reduce
# ...` exceeded ... only 7 of them arrived on time": seen with the timeout set to 2 s under load;
# at the default, test workers died at the same point with no message kept). The tests allow
# 15 minutes (a real deadlock still ends the process) and say so after 2.
if tuple(int(x) for x in version("jaxlib").split(".")[:3] if x.isdigit()) >= (0, 10, 2):
    _FLAGS += [
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
        "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    ]
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
# libtpu is installed by the `tpu` extra (for ahead-of-time TPU compiles); the tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Only topology descriptions are loaded from libtpu here (no chips), so several test processes
# (pytest-xdist workers, CLI subprocesses) may load it at once without its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def _xla_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session's processes (pytest-xdist workers
    and the CLI processes tests start; `jaxlm` commands read $JAXLM_XLA_CACHE): each program is
    compiled once per session, not once per process."""
    from jaxlm import compilation_cache

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    os.environ[compilation_cache.ENV] = str(root / "xla-cache")
    compilation_cache.enable()


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jaxlm-cache")


@pytest.fixture
def stdlib_cache(_session_cache, monkeypatch):
    """$JAXLM_CACHE pointed at a per-session directory (prepared corpora are reused within it)."""
    monkeypatch.setenv("JAXLM_CACHE", str(_session_cache))
    return _session_cache


@pytest.fixture(scope="session")
def _gcs_emulator():
    from tests.gcs_emulator import Emulator

    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(_gcs_emulator, monkeypatch):
    """gs://NAME of a new bucket on a local Cloud Storage emulator; this process and the
    processes it starts (the environment is set) reach the emulator, never the internet."""
    for k, v in _gcs_emulator.env().items():
        monkeypatch.setenv(k, v)
    return f"gs://{_gcs_emulator.new_bucket()}"
