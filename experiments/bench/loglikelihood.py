"""Log-likelihood scoring throughput (the harness's `loglikelihood` path): packed batches vs
padded batches vs one request at a time, with and without running a shared context once.

A synthetic multiple-choice workload shaped like HellaSwag/ARC (each document: one context of
40-200 tokens and four continuations of 4-30 tokens) scored by `jaxlm.evals.scoring` four
ways: `shared` (the default: each context once into a KV cache, `--batch` contexts per pass,
its choices on copies of the cache row), `packed` (each request whole, several per row as
segments, `--batch` rows per pass), `padded` (one request per row, `--batch` rows) and
`one_at_a_time` (one request per pass); all sort by length, pad to buckets and run the
vocabulary head on the continuation positions only. Each runs once to compile, then all are
timed interleaved over `--rounds` rounds on the same requests. Prints one JSON object as its
last line: requests/s and tokens/s (request tokens, context counted per choice) of each and
`speedup_<way>` (against one at a time).

    python experiments/bench/loglikelihood.py [--docs 32] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.overrides import load_config
from jaxlm.evals.scoring import score_continuations
from jaxlm.model.transformer import Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = load_config(
        "tiny",
        [
            "model.vocab_size=8192",
            "model.d_model=256",
            "model.num_layers=4",
            "model.num_heads=4",
            "model.mlp_dim=1024",
            "model.max_seq_len=256",
        ],
    ).model
    params = jax.jit(Transformer(config).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(params["params"])
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(args.docs):
        context = rng.integers(3, config.vocab_size, rng.integers(40, 201)).tolist()
        for _ in range(args.choices):
            choice = rng.integers(3, config.vocab_size, rng.integers(4, 31)).tolist()
            requests.append((context, choice))
    tokens = sum(len(c) + len(x) - 1 for c, x in requests)

    def run(batch: int, **kwargs: bool) -> Callable[[], list]:
        return lambda: score_continuations(config, params, requests, batch_size=batch, **kwargs)

    off = dict(share_contexts=False)
    runs = {
        "shared": run(args.batch),
        "packed": run(args.batch, **off),
        "padded": run(args.batch, pack=False, **off),
        "one_at_a_time": run(1, pack=False, **off),
    }
    compile_s = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - start
    a, b = runs["shared"](), runs["one_at_a_time"]()
    worst = max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    out = {
        "requests": len(requests),
        "tokens": tokens,
        "batch": args.batch,
        "device": jax.devices()[0].device_kind,
        "max_abs_logprob_diff": worst,
        **{f"{n}_first_run_s": round(s, 3) for n, s in compile_s.items()},
        **{f"{n}_s": round(s, 4) for n, s in best.items()},
        **{f"{n}_median_s": round(statistics.median(t), 4) for n, t in times.items()},
        **{f"{n}_requests_per_s": round(len(requests) / s, 1) for n, s in best.items()},
        **{f"{n}_tokens_per_s": round(tokens / s) for n, s in best.items()},
        **{
            f"speedup_{n}": round(best["one_at_a_time"] / best[n], 2)
            for n in ("shared", "packed", "padded")
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
