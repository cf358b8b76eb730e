"""Which JAX platforms to start: libtpu only where a TPU chip is attached.

With the `tpu` extra installed (libtpu, for ahead-of-time TPU compiles from any machine), JAX
tries to start the TPU runtime on every machine, and on one without TPUs libtpu prints start-up
errors ("Failed to find host bounds for accelerator type", "unexpected worker hostname") before
falling back to the CPU. A healthy run should not print errors, so where this machine has no
accelerator JAX could use and nobody chose the platforms, only the CPU is started. TPU topologies
for ahead-of-time compiles (`jaxlm info --topology`, `jax.experimental.topologies`) load libtpu
by themselves and still work.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Any

_GOOGLE_PCI_VENDOR = "0x1ae0"  # every TPU generation's PCI vendor id
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def has_tpu_chips() -> bool:
    """Whether TPU chips are attached to this machine (PCI devices of Google's vendor id, or the
    /dev/accel* devices of older TPU VMs), found without loading libtpu."""
    if glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def only_cpu_here() -> bool:
    """Whether the CPU is the only platform JAX could use on this machine: Linux with neither
    TPU chips nor GPU device files (elsewhere, e.g. macOS with a Metal plugin, nothing is
    assumed)."""
    if not sys.platform.startswith("linux"):
        return False
    return not has_tpu_chips() and not any(os.path.exists(f) for f in _GPU_DEVICE_FILES)


def skip_absent_accelerators() -> bool:
    """Start only JAX's CPU platform where it is the only one this machine has, unless the user
    chose platforms (`JAX_PLATFORMS` / `jax_platforms`) or JAX has already started its
    backends. Returns whether it did. Call before anything asks JAX for devices."""
    import jax

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or not only_cpu_here():
        return False
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # an internal moved: choose as if nothing had started
        pass
    jax.config.update("jax_platforms", "cpu")
    return True


def tpu_topology(name: str, num_slices: int = 1) -> Any:
    """`jax.experimental.topologies.get_topology_desc` for TPU topology `name` (e.g. 'v5p:2x2x2'):
    devices to compile for ahead of time, from any machine with libtpu (the `tpu` extra).
    `num_slices` > 1: that many slices of it, joined by the data-center network (DCN).

    Only a description is loaded, no chips are used, so libtpu's lock is not taken (this also
    works beside a running job on a TPU VM). On a machine without TPU chips, libtpu is told
    this host's worker and accelerator type first, which it would otherwise look up in a cloud
    metadata server that is not there and print errors about; the topology asked for is what
    the compile targets either way (measured: the same bytes and FLOPs with and without)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not has_tpu_chips():
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    from jax.experimental import topologies

    if num_slices > 1:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=name, num_slices=num_slices
        )
    return topologies.get_topology_desc(platform="tpu", topology_name=name)
