"""A clean start with the `tpu` extra on a machine without TPUs: no libtpu start-up errors from
`jaxlm` commands (JAX alone prints them here, which the first test checks), ahead-of-time TPU
topologies still described, and a user's own JAX_PLATFORMS respected."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxlm import platforms

LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "E0000")

pytestmark = pytest.mark.skipif(
    not platforms.only_cpu_here() or importlib.util.find_spec("libtpu") is None,
    reason="checks the clean start of a CPU-only Linux machine with libtpu installed",
)


def _run(*args, platforms_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
    env.pop("XLA_FLAGS", None)  # the tests' 8 fake devices
    if platforms_env is not None:
        env["JAX_PLATFORMS"] = platforms_env
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_jax_alone_prints_libtpu_errors_here_and_jaxlm_commands_do_not():
    # The reference: plain JAX on this machine starts libtpu, which complains.
    raw = _run("-c", "import jax; print(jax.devices())")
    assert raw.returncode == 0 and "CpuDevice" in raw.stdout
    assert any(n in raw.stderr for n in LIBTPU_NOISE), raw.stderr
    info = _run("-m", "jaxlm", "info", "--config", "tiny")
    assert info.returncode == 0, info.stderr
    assert "attention:" in info.stdout and info.stderr == "", info.stderr
    # A TPU topology for ahead-of-time compiles is still described (libtpu loaded for it),
    # without the errors.
    aot = _run("-m", "jaxlm", "info", "--config", "ladder-0", "--topology", "v5e:2x2",
               "--set", "mesh.fsdp=4")  # fmt: skip
    assert aot.returncode == 0, aot.stderr
    assert "attention on v5e:2x2:       splash" in aot.stdout
    assert "params + Adam per chip" in aot.stdout
    assert not any(n in aot.stderr for n in LIBTPU_NOISE), aot.stderr


def test_only_the_cpu_is_started_unless_the_user_chose_platforms():
    code = (
        "from jaxlm import platforms; import jax; "
        "print(platforms.skip_absent_accelerators(), jax.config.jax_platforms, jax.devices())"
    )
    assert _run("-c", code).stdout.startswith("True cpu [CpuDevice")
    chosen = _run("-c", code, platforms_env="cpu")
    assert chosen.stdout.startswith("False cpu [CpuDevice"), chosen.stderr
    # Once JAX has started its backends, nothing is changed.
    late = "import jax; jax.devices(); from jaxlm import platforms as p; "
    late += "print(p.skip_absent_accelerators())"
    assert _run("-c", late).stdout.strip() == "False"
