"""Serving throughput and latency: continuous batching vs the same requests one at a time.

The model is `decode.py`'s GPT-2-style shape (vocab 1024, d_model 256, 4 layers, float32,
max_seq_len 256), random weights. 64 requests with mixed prompt lengths (8-120 token ids) and
budgets (16-128 new tokens, no stop), half of them streamed, seeded sampling at temperature
0.8, are sent over loopback HTTP to `jaxlm.serve` in-process:

  (a) batched: all 64 clients at once (one thread each) against a server with `--slots` rows;
  (b) one at a time: the same requests in sequence against a one-row server.

Both servers are compiled and warmed up first; the rounds interleave (a, b, a, b, ...). Each
round checks every request got its full budget and the same text in both modes. Prints one JSON
object as its last line: tokens/s, p50/p99 request latency and p50 time to first streamed token
of each mode (medians over rounds), and `throughput_ratio` (a/b).

    python experiments/bench/serve.py [--rounds 2] [--slots 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time

import jax
import numpy as np
from decode import CONFIG  # the decode benchmark's model (this script's directory)

from jaxlm.data import ByteTokenizer
from jaxlm.model.transformer import init_params
from jaxlm.serve.engine import Engine
from jaxlm.serve.http import Server


def _requests(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prompt = rng.integers(3, CONFIG.vocab_size, int(rng.integers(8, 121))).tolist()
        out.append(
            {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": int(rng.integers(16, 129)),
                "temperature": 0.8,
                "seed": i,
                "stream": bool(i % 2),
            }
        )
        if out[-1]["stream"]:
            out[-1]["stream_options"] = {"include_usage": True}
    return out


def _send(port: int, body: dict) -> dict:
    """One request: its latency, time to first streamed event, text and completion tokens."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = None
    if body["stream"]:
        text, tokens = "", 0
        for line in response:
            if first is None:
                first = time.perf_counter() - start
            line = line.strip()
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                text += event["choices"][0]["text"]
            else:
                tokens = event["usage"]["completion_tokens"]
    else:
        reply = json.loads(response.read())
        text, tokens = reply["choices"][0]["text"], reply["usage"]["completion_tokens"]
    conn.close()
    return {"latency": time.perf_counter() - start, "ttft": first, "text": text, "tokens": tokens}


def _batched(port: int, bodies: list[dict]) -> tuple[float, list[dict]]:
    results: list[dict] = [{}] * len(bodies)

    def run(i: int) -> None:
        results[i] = _send(port, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def _serial(port: int, bodies: list[dict]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = [_send(port, b) for b in bodies]
    return time.perf_counter() - start, results


def _summary(seconds: float, results: list[dict]) -> dict[str, float]:
    latency = sorted(r["latency"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / seconds,
        "p50_latency_s": float(np.percentile(latency, 50)),
        "p99_latency_s": float(np.percentile(latency, 99)),
        "p50_first_event_s": float(np.percentile(ttft, 50)),
        "wall_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    params = init_params(CONFIG, jax.random.key(0))
    tok = ByteTokenizer()
    servers = {}
    for mode, slots in (("batched", args.slots), ("one_at_a_time", 1)):
        engine = Engine(CONFIG, params, slots).start()
        servers[mode] = Server(engine, tok, "bench", port=0).start()
    bodies = _requests(args.requests)
    # Warm-up: every prompt/budget bucket compiled in both engines.
    _batched(servers["batched"].port, bodies)
    _batched(servers["one_at_a_time"].port, bodies)
    runs: dict[str, list[dict]] = {"batched": [], "one_at_a_time": []}
    texts: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for mode, fn in (("batched", _batched), ("one_at_a_time", _serial)):
            seconds, results = fn(servers[mode].port, bodies)
            for r, b in zip(results, bodies, strict=True):
                assert r["tokens"] == b["max_tokens"], (mode, r["tokens"], b["max_tokens"])
            texts.setdefault(mode, [r["text"] for r in results])
            runs[mode].append(_summary(seconds, results))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    assert texts["batched"] == texts["one_at_a_time"], "the two modes gave different text"
    for s in servers.values():
        s.shutdown(timeout=60)
    out = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()
    }
    result = {
        "requests": args.requests,
        "slots": args.slots,
        "new_tokens": sum(b["max_tokens"] for b in bodies),
        **out,
        "throughput_ratio": out["batched"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"],
        "devices": str(jax.devices()[0].platform),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
