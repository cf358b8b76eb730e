"""Test setup: 8 fake CPU devices (set before jax is imported) and strict rank promotion."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
# libtpu is installed by the `tpu` extra (for ahead-of-time TPU compiles); the tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Only topology descriptions are loaded from libtpu here (no chips), so several test processes
# (pytest-xdist workers, CLI subprocesses) may load it at once without its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import pytest

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
