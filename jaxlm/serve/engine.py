"""Continuous batching: requests in, tokens out, over the compiled slots of `slots.py`.

One thread owns the device. Between decode steps it frees the rows of finished or cancelled
requests and prefills waiting requests into free rows (first come, first served); then it runs
one decode step for all rows and hands each live request its new token. A request leaves its row
as soon as it produces one of its stop tokens or reaches its `max_tokens`.

Callers (the HTTP layer) see only token ids: `submit` a `Request`, read its `events` queue
((request, token id) pairs, then one (request, `Finished`)), and `cancel` it when its client
goes away. Several requests may share one queue.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sample, sharding
from jaxlm.configs.model import ModelConfig
from jaxlm.serve import slots as device


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended ("stop", "length", "cancelled" or "error")."""

    reason: str
    error: str | None = None


class EngineStopped(RuntimeError):
    """The engine no longer takes requests (it is draining or has stopped)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate: prompt ids, a token budget, stop ids and sampling settings.

    `seed` gives the same tokens as `sample.generate(..., key=seed)` with the same settings
    (`sample.strategies(temperature, top_k, top_p)`) for this prompt alone."""

    prompt: Sequence[int]
    max_tokens: int
    stop_ids: Sequence[int] = ()
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    generated: int = 0
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (its row is freed before the next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """`slots` rows of up to the model's context decoded together, `steps_per_call` decode steps
    per compiled call (fewer host round trips; a row admitted or finished waits for the call's
    end, and tokens a row makes after its stop are dropped).

    `params` are the model's (sharded over `mesh` with logical `rules`, or on one device); call
    `start()` (or use the engine as a context manager), then `submit` requests from any thread.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        slots: int = 16,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: str | None = None,
        pad_id: int = 0,
        steps_per_call: int = 4,
    ) -> None:
        sample._check_chain((), config)
        sample._check_params(config, params)
        if not (isinstance(slots, int) and 1 <= slots <= 4096):
            raise ValueError(f"slots={slots!r} must be an integer in [1, 4096]")
        if not (isinstance(steps_per_call, int) and 1 <= steps_per_call <= 64):
            raise ValueError(f"steps_per_call={steps_per_call!r} must be an integer in [1, 64]")
        self.steps_per_call = steps_per_call
        self.config, self.params, self.slots = config, params, slots
        self.context = config.max_seq_len - config.prompt_tokens  # prompt + new tokens, at most
        self._mesh = (mesh, rules or "default") if mesh is not None else None
        self._pad_id = pad_id
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * slots
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for tests and statistics)
        self.error: str | None = None
        # Per-row host state; the cache lives on the device.
        self._tokens = np.zeros(slots, np.int32)
        self._keys = np.zeros((slots, 2), np.uint32)
        self._counts = np.zeros(slots, np.int32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._cache = None

    # --- the callers' side ----------------------------------------------------------------

    def check(self, request: Request) -> None:
        """A ValueError naming what is wrong with `request` (the same checks as `generate`)."""
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens!r} must be an integer >= 1")
        sample.prepare(self.config, [request.prompt], request.max_tokens, [request.stop_ids])
        sample.Temperature(request.temperature)
        if request.top_k:
            sample._check_chain((sample.TopK(request.top_k),), self.config)
        sample.TopP(request.top_p)

    def submit(self, request: Request) -> Request:
        """Queue `request` (checked first); its tokens arrive on `request.events`."""
        self.check(request)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and takes no new requests")
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def alive(self) -> bool:
        """The engine's thread is running (False before `start` and after `stop`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> dict[str, int]:
        """Requests decoding now and waiting for a row."""
        with self._lock:
            busy = sum(r is not None for r in self._rows)
            return {"running": busy, "waiting": len(self._waiting), "slots": self.slots}

    def start(self) -> Engine:
        """Compile the decode step and start the engine's thread."""
        with self._context():
            length = self.config.max_seq_len
            if sample.uses_ring(self.config, length):
                length = self.config.sliding_window  # a ring buffer of the window
            self._cache = device.empty_cache(config=self.config, slots=self.slots, length=length)
            self._step()  # compiles the one decode step now, not at the first request
        self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish every queued and running one first
        (otherwise they end as "cancelled"); then stop the thread."""
        with self._lock:
            self._accepting = False
            if not drain:
                for r in [*self._waiting, *self._rows]:
                    if r is not None:
                        r.cancel()
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(drain=False)

    # --- the engine's thread --------------------------------------------------------------

    def _context(self) -> Any:
        import contextlib

        if self._mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(*self._mesh)

    def _run(self) -> None:
        with self._context():
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not any(self._rows):
                        self._lock.wait()
                    if self._stop and not self._waiting and not any(self._rows):
                        return
                try:
                    self._admit()
                    if any(self._rows):
                        self._deliver(self._step())
                except Exception as e:  # an XLA failure: fail what is running, keep serving
                    self.error = f"{type(e).__name__}: {e}"
                    for i, r in enumerate(self._rows):
                        if r is not None:
                            self._finish(i, Finished("error", self.error))

    def _admit(self) -> None:
        """Free the rows of cancelled requests, then fill free rows from the queue."""
        for i, r in enumerate(self._rows):
            if r is not None and r.cancelled:
                self._finish(i, Finished("cancelled"))
        while None in self._rows:
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled:
                request.events.put((request, Finished("cancelled")))
                continue
            try:
                self._insert(self._rows.index(None), request)
            except Exception as e:  # this request's prefill failed: it ends, others go on
                request.events.put((request, Finished("error", f"{type(e).__name__}: {e}")))
                if request in self._rows:
                    self._rows[self._rows.index(request)] = None

    def _insert(self, row: int, r: Request) -> None:
        batch = sample.prepare(self.config, [r.prompt], r.max_tokens, [r.stop_ids], self._pad_id)
        key = jax.random.key_data(jax.random.key(r.seed))
        first, self._cache = device.insert(
            self.params,
            self._cache,
            jnp.int32(row),
            batch.tokens,
            batch.lengths,
            key,
            jnp.float32(r.temperature),
            jnp.int32(r.top_k),
            jnp.float32(r.top_p),
            config=self.config,
            cache_len=batch.cache_len,
        )
        self._rows[row] = r
        self._keys[row] = np.asarray(key)
        self._temperature[row], self._top_k[row], self._top_p[row] = (
            r.temperature,
            r.top_k,
            r.top_p,
        )
        self._counts[row] = 0
        self._emit(row, int(first))

    def _step(self) -> np.ndarray:
        active = np.asarray([r is not None for r in self._rows])
        next_NB, self._cache = device.step(
            self.params,
            self._cache,
            self._tokens,
            active,
            self._keys,
            self._counts,
            self._temperature,
            self._top_k,
            self._top_p,
            config=self.config,
            steps=self.steps_per_call,
        )
        self.steps += self.steps_per_call
        return np.asarray(next_NB)

    def _deliver(self, next_NB: np.ndarray) -> None:
        for next_B in next_NB:
            for i, r in enumerate(self._rows):
                if r is not None:  # a row that finished in this call stops taking tokens
                    self._emit(i, int(next_B[i]))

    def _emit(self, row: int, token: int) -> None:
        """Row `row`'s request produced `token` (its token number counts[row])."""
        r = self._rows[row]
        assert r is not None
        self._tokens[row] = token
        self._counts[row] += 1
        r.generated += 1
        r.events.put((r, token))
        if token in r.stop_ids:
            self._finish(row, Finished("stop"))
        elif r.generated >= r.max_tokens:
            self._finish(row, Finished("length"))

    def _finish(self, row: int, why: Finished) -> None:
        r = self._rows[row]
        assert r is not None
        self._rows[row] = None
        self._temperature[row], self._top_k[row], self._top_p[row] = 0.0, 0, 1.0
        r.events.put((r, why))
