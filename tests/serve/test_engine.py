"""Continuous batching: every request gets what `generate` gives it alone, whatever shares the
batch; cancelled requests free their rows; stopping drains."""

import threading

import numpy as np
import pytest

from jaxlm import sample
from jaxlm.serve.engine import Engine, EngineStopped, Finished, Request
from tests.serve.conftest import CFG


def _collect(requests, timeout=300):
    """Each request's tokens and finish reason, read from the (shared or own) queues."""
    out = {id(r): ([], None) for r in requests}
    queues = {id(r.events): r.events for r in requests}
    for q in queues.values():
        while any(out[id(r)][1] is None for r in requests if r.events is q):
            r, event = q.get(timeout=timeout)
            if isinstance(event, Finished):
                out[id(r)] = (out[id(r)][0], event.reason)
            else:
                out[id(r)][0].append(event)
    return [out[id(r)] for r in requests]


def _alone(params, r):
    chain = sample.strategies(r.temperature, r.top_k or None, r.top_p if r.top_p < 1 else None)
    return sample.generate(
        CFG, params, [r.prompt], r.max_tokens, key=r.seed, chain=chain, stop_tokens=r.stop_ids
    )[0]


def test_each_request_gets_what_generate_gives_it_alone(params):
    """Nine requests through three rows (so most wait, and rows are refilled mid-flight):
    greedy, seeded sampling with temperature, top-k and top-p, and stop ids, each against
    `generate`. One prompt and one budget are past the first bucket (16)."""
    rng = np.random.default_rng(0)
    settings = [(0.0, 0, 1.0), (0.7, 20, 1.0), (1.0, 0, 0.9), (0.7, 20, 0.9)]
    requests = []
    for i in range(9):
        t, k, p = settings[i % 4]
        n = 37 if i == 4 else int(rng.integers(1, 17))
        requests.append(
            Request(
                prompt=rng.integers(3, 300, n).tolist(),
                max_tokens=24 if i == 5 else int(rng.integers(1, 17)),
                temperature=t,
                top_k=k,
                top_p=p,
                seed=i,
                stop_ids=(5, 7),
            )
        )
    with Engine(CFG, params, slots=3) as engine:
        for r in requests:
            engine.submit(r)
        got = _collect(requests)
        steps = engine.steps - engine.steps_per_call  # the warm-up call
    for r, (tokens, why) in zip(requests, got, strict=True):
        want = _alone(params, r)
        assert tokens == want, (r.temperature, r.top_k, r.top_p)
        assert why == ("stop" if want[-1] in r.stop_ids else "length")
    # Requests shared steps: far fewer steps than tokens.
    assert steps < 0.6 * sum(len(t) for t, _ in got)


def test_a_cancelled_request_frees_its_row_for_the_next(params):
    engine = Engine(CFG, params, slots=1).start()
    try:
        long = engine.submit(Request(prompt=[4, 5, 6], max_tokens=100, temperature=0))
        waiting = engine.submit(Request(prompt=[9, 8], max_tokens=3, temperature=0))
        r, _ = long.events.get(timeout=120)  # running now
        assert r is long and engine.load["running"] == 1 and engine.load["waiting"] == 1
        long.cancel()
        tokens, why = _collect([waiting])[0]
        assert why == "length" and tokens == _alone(params, waiting)
        assert _collect([long])[0][1] == "cancelled" and long.generated < 100
        assert engine.load == {"running": 0, "waiting": 0, "slots": 1}
    finally:
        engine.stop(drain=False)


def test_stop_finishes_what_was_accepted_then_refuses(params):
    engine = Engine(CFG, params, slots=2).start()
    requests = [Request(prompt=[7 + i], max_tokens=12, temperature=0) for i in range(3)]
    for r in requests:
        engine.submit(r)
    stopper = threading.Thread(target=engine.stop)  # drains
    stopper.start()
    got = _collect(requests)
    stopper.join(timeout=120)
    assert [why for _, why in got] == ["length"] * 3
    assert [t for t, _ in got] == [_alone(params, r) for r in requests]
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.submit(Request(prompt=[1], max_tokens=1))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(prompt=[], max_tokens=3), "empty"),
        (dict(prompt=[1, 2], max_tokens=0), "max_tokens=0"),
        (dict(prompt=[1, 2], max_tokens=127), "max_seq_len=128"),
        (dict(prompt=[1, 999], max_tokens=3), r"outside the vocabulary \[0, 320\)"),
        (dict(prompt=[1], max_tokens=3, temperature=-0.5), "temperature=-0.5"),
        (dict(prompt=[1], max_tokens=3, top_p=1.5), "top_p=1.5"),
        (dict(prompt=[1], max_tokens=3, top_k=1000), "top_k=1000"),
    ],
)
def test_bad_requests_are_refused_at_submit(params, bad, message):
    engine = Engine(CFG, params, slots=1)  # not started: nothing compiles
    with pytest.raises(ValueError, match=message):
        engine.submit(Request(**bad))


def test_bad_engine_settings_are_refused(params):
    with pytest.raises(ValueError, match="slots=0 must be an integer in"):
        Engine(CFG, params, slots=0)
    with pytest.raises(ValueError, match="params do not match"):
        Engine(CFG, {"params": params}, slots=1)


def test_a_sliding_window_model_is_served_from_a_ring_buffer(params):
    """Window 8 (every layer): the shared cache holds 8 slots per row, and requests running far
    past the window still get `generate`'s tokens."""
    import dataclasses

    cfg = dataclasses.replace(CFG, sliding_window=8)
    requests = [
        Request(prompt=list(range(3, 3 + n)), max_tokens=m, temperature=t, seed=n)
        for n, m, t in ((3, 40, 0.0), (20, 30, 0.8), (5, 6, 0.0))
    ]
    with Engine(cfg, params, slots=2) as engine:
        assert engine._cache.max_length == 8
        for r in requests:
            engine.submit(r)
        got = _collect(requests)
    for r, (tokens, _) in zip(requests, got, strict=True):
        chain = sample.strategies(r.temperature)
        want = sample.generate(cfg, params, [r.prompt], r.max_tokens, key=r.seed, chain=chain)
        assert tokens == want[0]
