"""Multi-process runs: joining `jax.distributed`, checking processes agree, small host exchanges.

Every process of a run executes the same program on its own devices (JAX's multi-controller
model). On a Cloud TPU VM pod slice, SLURM or Open MPI, JAX finds the coordinator and the process
ids itself; elsewhere give `coordinator`, `num_processes` and `process_id` (or the environment
variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).

A process that dies stops sending heartbeats; after `heartbeat_timeout_s` JAX's coordination
service terminates the others with an error naming the dead task, so a run never hangs forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the arguments or the environment, checked;
    None when none of the three is given (single process, or a cluster JAX detects itself)."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    given = {
        "--coordinator": coordinator,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs --coordinator, --num-processes and --process-id (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: {missing}"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    if not _ADDRESS.match(coordinator) or not 0 < int(coordinator.rsplit(":", 1)[1]) < 65536:
        raise ValueError(
            f"--coordinator {coordinator!r} must be HOST:PORT with a port in [1, 65535], "
            "e.g. 10.0.0.2:8476 (the address of process 0)"
        )
    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id {process_id} must be in [0, {num_processes - 1}] "
            f"(--num-processes {num_processes})"
        )
    return coordinator, num_processes, process_id


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    init_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Join the run's other processes (before anything touches a device); True if multi-process.

    Without arguments or environment variables, JAX's own cluster detection decides (Cloud TPU
    VMs, SLURM, Open MPI, ...); on a machine that is none of those this is a single-process run.
    Calling it again once initialised does nothing.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = resolve(coordinator, num_processes, process_id)
    # Multi-process collectives on CPU need an implementation; harmless on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(
        initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s
    )
    if explicit is None:
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as e:
            # JAX found no cluster environment to read the coordinator from: one process.
            if "coordinator_address" not in str(e):
                raise
            return False
        except RuntimeError as e:
            # This process already used JAX (a notebook, a script calling `cli.main` twice):
            # with nothing asked for, it runs on its own.
            if "must be called before" not in str(e):
                raise
            print(
                "note: JAX was used in this process before jaxlm could look for other processes "
                "to join; running as one process",
                file=sys.stderr,
            )
            return False
    else:
        address, count, index = explicit
        if count == 1:
            return False
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index, **timeouts
        )
    return jax.process_count() > 1


_WAIT_MS = 300_000  # how long a process waits for the others' answers before failing
_agreements = 0  # check_agreement calls so far (each uses fresh keys)


def _client() -> Any:
    # The coordination-service client that JAX's own multihost utilities use (no public name).
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (a collective: all call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes, strict=True)]


def to_host(x: Any) -> np.ndarray:
    """`x` as a NumPy array on every process: gathered from the other processes when it spans
    devices this process cannot address (e.g. a batch split over a multi-host mesh)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-serialisable value (e.g. a config as a dict)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def check_agreement(facts: dict[str, Any]) -> None:
    """Raise on every process, naming the processes and values, unless all processes report the
    same `facts` (e.g. config fingerprint, jaxlm version, local device count).

    Uses the coordination service's key-value store, not a device collective, so processes with
    different device counts still get the error instead of a hang or a shape mismatch.
    """
    if jax.process_count() == 1:
        return
    global _agreements
    _agreements += 1
    client = _client()
    me, count = jax.process_index(), jax.process_count()
    prefix = f"jaxlm/agree/{_agreements}"
    client.key_value_set(f"{prefix}/{me}", json.dumps(facts, sort_keys=True))
    reported = [
        json.loads(client.blocking_key_value_get(f"{prefix}/{i}", _WAIT_MS)) for i in range(count)
    ]
    differing = sorted({k for r in reported for k in r if r.get(k) != reported[0].get(k)})
    if differing:
        details = "; ".join(
            f"{k}: " + ", ".join(f"process {i} {r.get(k)!r}" for i, r in enumerate(reported))
            for k in differing
        )
        raise ValueError(
            f"the {count} processes of this run disagree ({details}); start every process with "
            "the same command, config and jaxlm version, on hosts with the same devices"
        )


class StopAgreement:
    """Agree on the step at which every process stops, without a device collective.

    The first process that wants to stop (e.g. it got SIGTERM) publishes `its step + margin` in
    the coordination service; every process polls it once per step (a small RPC, no device sync,
    so the host keeps dispatching ahead). In jaxlm's loop no process runs more than one step ahead
    of another (each waits for the previous step's metrics, which need every process), so a
    margin of 2 steps is reached by all of them before any has passed it.
    """

    _KEY = "jaxlm/stop_at"

    def __init__(self, margin: int = 2) -> None:
        self.margin = margin
        self.stop_at: int | None = None

    def should_stop(self, step: int, wants_to_stop: bool) -> bool:
        if jax.process_count() == 1:
            return wants_to_stop
        client = _client()
        if self.stop_at is None and wants_to_stop:
            # Fails with ALREADY_EXISTS when another process published first: use theirs.
            with contextlib.suppress(Exception):
                client.key_value_set(self._KEY, str(step + self.margin))
        if self.stop_at is None:
            try:
                self.stop_at = int(client.key_value_try_get(self._KEY))
            except Exception:  # NOT_FOUND: nobody asked to stop
                return False
        return step >= self.stop_at
