"""Decoding speed: the compiled KV-cache loop vs recomputing without a cache vs a Python loop.

The model is the training benchmark's GPT-2-style shape (vocab 1024, d_model 256, 4 layers,
4 heads, MLP 1024, float32) with max_seq_len 256. For batch 1 and 8, a 64-token prompt and 128
new greedy tokens, it times (after compiling each once):

  (a) `jaxlm.sample.generate`: prefill + the whole decode loop in one `lax.while_loop`;
  (b) no cache: a compiled `fori_loop` that reruns the full forward pass on the sequence so far
      (padded to prompt + new tokens) for every new token;
  (c) a Python loop calling a jitted `decode_step` per token and reading each token back (as
      a loop that checks stop tokens or streams must).

Prints one JSON object as its last line, including `cache_vs_nocache_speedup` (a/b, batch 8)
and `compiled_vs_python_loop_speedup` (a/c, batch 1).

    python experiments/bench/decode.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sample
from jaxlm.configs import ModelConfig
from jaxlm.model.kv_cache import init_cache
from jaxlm.model.transformer import Transformer, init_params

PROMPT, NEW = 64, 128
CONFIG = ModelConfig(
    vocab_size=1024,
    d_model=256,
    num_layers=4,
    num_heads=4,
    mlp_dim=1024,
    max_seq_len=256,
    activation="gelu_tanh",
    scan_layers=False,
)


@functools.partial(jax.jit, static_argnames=("new",))
def _nocache(params, prompt_BT, new: int):
    b, t = prompt_BT.shape
    length = t + new
    tokens = jnp.zeros((b, length), jnp.int32).at[:, :t].set(prompt_BT)

    def body(i, tokens):
        segments = jnp.broadcast_to((jnp.arange(length) < i).astype(jnp.int32), (b, length))
        logits = Transformer(CONFIG).apply({"params": params}, tokens, segment_ids_BT=segments)[0]
        return tokens.at[:, i].set(jnp.argmax(logits[:, i - 1], axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(t, length, body, tokens)[:, t:]


_prefill = jax.jit(lambda p, t, n, c: sample.prefill(CONFIG, p, t, n, c))


@jax.jit
def _step(params, tokens_B, cache):
    logits, cache = sample.decode_step(CONFIG, params, tokens_B, cache)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def _python_loop(params, prompt_BT):
    b = prompt_BT.shape[0]
    cache = init_cache(CONFIG, b, PROMPT + NEW)
    logits, cache = _prefill(params, prompt_BT, jnp.full((b,), PROMPT, jnp.int32), cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = [np.asarray(token)]
    for _ in range(NEW - 1):
        token, cache = _step(params, token, cache)
        out.append(np.asarray(token))  # the host sees every token (stop checks, streaming)
    return np.stack(out, axis=1)


def _time(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    params = init_params(CONFIG, jax.random.key(0))
    result: dict = {"device": jax.devices()[0].device_kind, "prompt": PROMPT, "new_tokens": NEW}
    for b in (1, 8):
        prompt = np.random.default_rng(b).integers(3, CONFIG.vocab_size, (b, PROMPT)).tolist()
        prompt_arr = jnp.asarray(prompt, jnp.int32)
        runs = {
            "cached_loop": lambda p=prompt: sample.generate(CONFIG, params, p, NEW),
            "nocache": lambda a=prompt_arr: _nocache(params, a, NEW),
            "python_loop": lambda a=prompt_arr: _python_loop(params, a),
        }
        # Same tokens from all three (greedy), so the timings compare like with like.
        ref = np.asarray(runs["cached_loop"]())
        assert (np.asarray(runs["nocache"]()) == ref).all()
        assert (np.asarray(runs["python_loop"]()) == ref).all()
        for name, fn in runs.items():
            seconds = _time(fn, args.repeats)
            result[f"b{b}_{name}_tokens_per_s"] = round(b * NEW / seconds, 1)
    result["cache_vs_nocache_speedup"] = round(
        result["b8_cached_loop_tokens_per_s"] / result["b8_nocache_tokens_per_s"], 2
    )
    result["cache_vs_nocache_speedup_b1"] = round(
        result["b1_cached_loop_tokens_per_s"] / result["b1_nocache_tokens_per_s"], 2
    )
    result["compiled_vs_python_loop_speedup"] = round(
        result["b1_cached_loop_tokens_per_s"] / result["b1_python_loop_tokens_per_s"], 2
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
