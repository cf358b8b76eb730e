"""Decoding speed: the compiled KV-cache loop vs recomputing without a cache vs a Python loop.

The model is the training benchmark's GPT-2-style shape (vocab 1024, d_model 256, 4 layers,
4 heads, MLP 1024, float32) with max_seq_len 256. For batch 1 and 8, a 64-token prompt and 128
new greedy tokens, it times (after compiling each once):

  (a) `jaxlm.sample.generate`: prefill + the whole decode loop in one `lax.while_loop`;
  (b) no cache: a compiled `fori_loop` that reruns the full forward pass on the sequence so far
      (padded to prompt + new tokens) for every new token;
  (c) a Python loop calling a jitted `decode_step` per token and reading each token back (as
      a loop that checks stop tokens or streams must);
  (d) a minimal reference: the same GPT-2 decoder in ~50 lines of plain JAX on the same
      parameters, with one position for all rows (no ragged prompts, stops or streaming), a
      fixed-length cache written by `dynamic_update_slice`, a `lax.scan` over the new tokens
      and argmax.

All four must give the same tokens. The runs are interleaved (one of each per round, median of
`--repeats` rounds). Prints one JSON object as its last line, including
`vs_reference_b1` / `vs_reference_b8` (a/d), `cache_vs_nocache_speedup` (a/b, batch 8) and
`compiled_vs_python_loop_speedup` (a/c, batch 1).

    python experiments/bench/decode.py [--repeats 5]
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


# --- a minimal reference: a GPT-2 decoder in plain JAX on the same parameters ----------------
# One position for every row (the prompts have equal lengths), so each step writes its keys and
# values with one dynamic_update_slice at that position; attention over the whole fixed-length
# cache with a position mask; prefill, then `lax.scan` over the new tokens taking the argmax.


def _ln(x, p):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + CONFIG.norm_eps) * p["scale"] + p["bias"]


def _ref_forward(params, tokens_BT, pos, cache):
    """Logits [B, T, V] of tokens at positions pos .. pos + T - 1, and the cache with them."""
    t = tokens_BT.shape[1]
    x = params["embed"]["embedding"][tokens_BT]
    x = x + jax.lax.dynamic_slice_in_dim(params["pos_embed"]["embedding"], pos, t)[None]
    visible_TS = jnp.arange(cache[0][0].shape[1])[None, :] <= pos + jnp.arange(t)[:, None]
    new_cache = []
    for i, (k_BSNH, v_BSNH) in enumerate(cache):
        p = params[f"layers_{i}"]
        h = _ln(x, p["attn_norm"])
        q, k, v = (jnp.einsum("btd,dnh->btnh", h, p["attn"][n]["w"]) + p["attn"][n]["b"]
                   for n in ("query", "key", "value"))  # fmt: skip
        k_BSNH = jax.lax.dynamic_update_slice_in_dim(k_BSNH, k, pos, axis=1)
        v_BSNH = jax.lax.dynamic_update_slice_in_dim(v_BSNH, v, pos, axis=1)
        s = jnp.einsum("btnh,bsnh->bnts", q, k_BSNH) * CONFIG.head_dim**-0.5
        a = jax.nn.softmax(jnp.where(visible_TS, s, -1e30), axis=-1)
        o = jnp.einsum("bnts,bsnh->btnh", a, v_BSNH)
        x = x + jnp.einsum("btnh,nhd->btd", o, p["attn"]["out"]["w"]) + p["attn"]["out"]["b"]
        h = _ln(x, p["mlp_norm"])
        h = jax.nn.gelu(h @ p["mlp"]["up"]["w"] + p["mlp"]["up"]["b"], approximate=True)
        x = x + h @ p["mlp"]["down"]["w"] + p["mlp"]["down"]["b"]
        new_cache.append((k_BSNH, v_BSNH))
    x = _ln(x, params["final_norm"])
    return x @ params["embed"]["embedding"].T, new_cache


@functools.partial(jax.jit, static_argnames=("new", "cache_len"))
def _reference(params, prompt_BT, new: int, cache_len: int):
    b, t = prompt_BT.shape
    shape = (b, cache_len, CONFIG.num_heads, CONFIG.head_dim)
    cache = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(CONFIG.num_layers)]
    logits, cache = _ref_forward(params, prompt_BT, 0, cache)
    first_B = jnp.argmax(logits[:, -1], axis=-1)

    def step(carry, _):
        token_B, pos, cache = carry
        logits, cache = _ref_forward(params, token_B[:, None], pos, cache)
        next_B = jnp.argmax(logits[:, -1], axis=-1)
        return (next_B, pos + 1, cache), next_B

    _, rest_NB = jax.lax.scan(step, (first_B, t, cache), length=new - 1)
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1).astype(jnp.int32)


def _times(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved (one of each per round)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    params = init_params(CONFIG, jax.random.key(0))
    result: dict = {"device": jax.devices()[0].device_kind, "prompt": PROMPT, "new_tokens": NEW}
    for b in (1, 8):
        prompt = np.random.default_rng(b).integers(3, CONFIG.vocab_size, (b, PROMPT)).tolist()
        prompt_arr = jnp.asarray(prompt, jnp.int32)
        cache_len = sample.prepare(CONFIG, prompt, NEW).cache_len
        runs = {
            "cached_loop": lambda p=prompt: sample.generate(CONFIG, params, p, NEW),
            "reference": lambda a=prompt_arr, n=cache_len: _reference(params, a, NEW, n),
            "nocache": lambda a=prompt_arr: _nocache(params, a, NEW),
            "python_loop": lambda a=prompt_arr: _python_loop(params, a),
        }
        # Same tokens from all (greedy), so the timings compare like with like (this also
        # compiles each).
        ref = np.asarray(runs["cached_loop"]())
        for name, fn in runs.items():
            same = float((np.asarray(fn()) == ref).mean())
            assert same == 1.0, f"{name}: {same:.3f} of the tokens equal generate's"
        for name, seconds in _times(runs, args.repeats).items():
            result[f"b{b}_{name}_tokens_per_s"] = round(b * NEW / seconds, 1)
        result[f"vs_reference_b{b}"] = round(
            result[f"b{b}_cached_loop_tokens_per_s"] / result[f"b{b}_reference_tokens_per_s"], 2
        )
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
