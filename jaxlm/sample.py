"""Sampling with a KV cache: `prefill`, `decode_step`, and `generate` (one `lax.while_loop`).

Strategies are small frozen dataclasses that transform logits and compose in order, e.g.
`(Temperature(0.8), TopK(40), TopP(0.95))`; `Greedy()` (or temperature 0) takes the argmax.
Every random draw uses `fold_in(key, step)`, so results depend only on the key, and the one-shot
loop and the streaming variant (`generate_stream`) give the same tokens.

Prompts are given as a right-padded [B, T] array plus per-row lengths (or left-padded, with
`padding="left"`); inside, row b's token at position p is always in cache slot p.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.model import ModelConfig
from jaxlm.distributed import to_host
from jaxlm.model.kv_cache import KVCache, init_cache, to_ring
from jaxlm.model.transformer import Transformer, abstract_params

_NEG = -1e30  # masked-out logits (finite, so a row never becomes all-NaN)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Always the most likely token."""


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Divide logits by `t` (> 0; `t` = 0 means greedy)."""

    t: float

    def __post_init__(self) -> None:
        if not 0 <= self.t < float("inf"):
            raise ValueError(f"temperature={self.t!r} must be finite and >= 0 (0 = greedy)")

    def __call__(self, logits_BV: jax.Array) -> jax.Array:
        return logits_BV / self.t


@dataclasses.dataclass(frozen=True)
class TopK:
    """Keep the `k` most likely tokens (ties at the k-th value are kept)."""

    k: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"top_k={self.k!r} must be an integer >= 1")

    def __call__(self, logits_BV: jax.Array) -> jax.Array:
        k = min(self.k, logits_BV.shape[-1])
        kth = jax.lax.top_k(logits_BV, k)[0][:, -1:]
        return jnp.where(logits_BV >= kth, logits_BV, _NEG)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches `p`."""

    p: float

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise ValueError(f"top_p={self.p!r} must be in (0, 1]")

    def __call__(self, logits_BV: jax.Array) -> jax.Array:
        return nucleus(logits_BV, self.p)


def nucleus(logits_BV: jax.Array, p: float | jax.Array) -> jax.Array:
    """`TopP` with `p` a number or one per row ([B, 1]): logits outside the smallest set of
    most likely tokens whose probability reaches p are masked out."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly before each token
    keep_BV = before_BV < p  # the first token is always kept
    # The smallest kept logit is the threshold (ties with it are kept too).
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, _NEG)


@dataclasses.dataclass(frozen=True)
class MinP:
    """Keep tokens whose probability is at least `p` times the most likely token's."""

    p: float

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"min_p={self.p!r} must be in [0, 1]")

    def __call__(self, logits_BV: jax.Array) -> jax.Array:
        top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
        # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p)
        return jnp.where(logits_BV >= top_B1 + jnp.log(self.p), logits_BV, _NEG)


Strategy = Greedy | Temperature | TopK | TopP | MinP


def strategies(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> tuple[Strategy, ...]:
    """The usual composition: temperature, then top-k, top-p and min-p filters (0 = greedy)."""
    if temperature == 0:
        return (Greedy(),)
    out: list[Strategy] = [Temperature(temperature)]
    if top_k is not None:
        out.append(TopK(top_k))
    if top_p is not None:
        out.append(TopP(top_p))
    if min_p is not None:
        out.append(MinP(min_p))
    return tuple(out)


def _is_greedy(chain: Sequence[Strategy]) -> bool:
    return any(isinstance(s, Greedy) or (isinstance(s, Temperature) and s.t == 0) for s in chain)


def filtered_logits(logits_BV: jax.Array, chain: Sequence[Strategy]) -> jax.Array:
    """`logits_BV` (float32) after every strategy in `chain`, in order."""
    logits_BV = logits_BV.astype(jnp.float32)
    for s in chain:
        if not isinstance(s, Greedy):
            logits_BV = s(logits_BV)
    return logits_BV


def sample_logits(logits_BV: jax.Array, key: jax.Array, chain: Sequence[Strategy]) -> jax.Array:
    """One token per row [B] (int32) from `logits_BV` under `chain`."""
    if _is_greedy(chain):
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, chain)).astype(jnp.int32)


def _right_pad(tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """Left-padded rows moved to the left edge (row b rolled by T - length[b])."""
    t = tokens_BT.shape[1]
    index_BT = (jnp.arange(t)[None, :] + (t - lengths_B)[:, None]) % t
    return jnp.take_along_axis(tokens_BT, index_BT, axis=1)


def prefill(
    config: ModelConfig,
    params: Any,
    prompt_tokens_BT: jax.Array,
    prompt_lengths_B: jax.Array,
    cache: KVCache,
    padding: str = "right",
) -> tuple[jax.Array, KVCache]:
    """Run the prompts through the model into `cache`: (logits of each row's last prompt token
    [B, V] (float32), cache with lengths = prompt lengths). A prefix LM's prompt is its
    bidirectional prefix."""
    if padding not in ("right", "left"):
        raise ValueError(f"padding={padding!r} must be 'right' or 'left'")
    if padding == "left":
        prompt_tokens_BT = _right_pad(prompt_tokens_BT, prompt_lengths_B)
    b, t = prompt_tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # A prefix LM reads its prompt bidirectionally (the prompt is the prefix).
    prefix_BT = positions_BT < prompt_lengths_B[:, None] if config.prefix_lm else None
    logits_BTV, cache, _ = Transformer(config).apply(
        {"params": params},
        prompt_tokens_BT,
        positions_BT,
        cache=cache,
        prefill=True,
        prefix_BT=prefix_BT,
    )
    last_B1V = jnp.take_along_axis(logits_BTV, (prompt_lengths_B - 1)[:, None, None], axis=1)
    # The cache also holds the prompt-tuning embeddings' slots (0 without prompt tuning).
    lengths_B = prompt_lengths_B + config.prompt_tokens
    return last_B1V[:, 0].astype(jnp.float32), cache.replace(lengths=lengths_B)


def uses_ring(config: ModelConfig, cache_len: int) -> bool:
    """Decoding `cache_len` positions of a sliding-window model keeps only its window: a ring
    buffer of `model.sliding_window` slots."""
    return config.sliding_window is not None and cache_len > config.sliding_window


def prefill_cache(
    config: ModelConfig,
    params: Any,
    prompt_tokens_BT: jax.Array,
    prompt_lengths_B: jax.Array,
    cache_len: int,
) -> tuple[jax.Array, KVCache]:
    """`prefill` into a new cache for `cache_len` positions: (last prompt logits [B, V], cache).
    A sliding-window model whose window is shorter gets a ring buffer of its window instead
    (the prompt is prefilled into an ordinary cache, then its last window moved over)."""
    b, t = prompt_tokens_BT.shape
    if not uses_ring(config, cache_len):
        cache = init_cache(config, b, cache_len)
        return prefill(config, params, prompt_tokens_BT, prompt_lengths_B, cache)
    cache = init_cache(config, b, t + config.prompt_tokens)
    logits_BV, cache = prefill(config, params, prompt_tokens_BT, prompt_lengths_B, cache)
    return logits_BV, to_ring(cache, config.sliding_window)


def decode_step(
    config: ModelConfig, params: Any, tokens_B: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (at position cache.lengths[b]): (next-token logits [B, V], cache)."""
    logits_B1V, cache, _ = Transformer(config).apply(
        {"params": params}, tokens_B[:, None], cache=cache
    )
    return logits_B1V[:, 0].astype(jnp.float32), cache


# --- the compiled loop -------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingState:
    """The while-loop carry: everything the loop needs to take the next step."""

    step: jax.Array  # scalar: tokens generated so far (max over rows)
    tokens_BN: jax.Array  # generated tokens, pad_id after a row stops
    next_B: jax.Array  # the token to feed next (the last one generated)
    done_B: jax.Array  # row finished (stop token or its max_new_tokens)
    num_B: jax.Array  # tokens generated per row (a stop token counts)
    carry: Any  # the decode function's state (the KV cache)


def _emit(state: SamplingState, token_B, max_new_B, stop_BS, pad_id) -> SamplingState:
    live_B = ~state.done_B
    token_B = jnp.where(live_B, token_B, pad_id)
    slot_B = jnp.minimum(state.num_B, state.tokens_BN.shape[1] - 1)
    written_BN = jax.vmap(lambda row, tok, i: row.at[i].set(tok))(state.tokens_BN, token_B, slot_B)
    tokens_BN = jnp.where(live_B[:, None], written_BN, state.tokens_BN)
    num_B = state.num_B + live_B.astype(jnp.int32)
    stopped_B = jnp.any(token_B[:, None] == stop_BS, axis=-1)
    done_B = state.done_B | (live_B & stopped_B) | (num_B >= max_new_B)
    return dataclasses.replace(
        state, step=state.step + 1, tokens_BN=tokens_BN, next_B=token_B, done_B=done_B, num_B=num_B
    )


def start_loop(
    first_logits_BV: jax.Array,
    carry: Any,
    key: jax.Array,
    chain: Sequence[Strategy],
    max_new_B: jax.Array,
    stop_BS: jax.Array,
    pad_id: int,
    buffer: int,
) -> SamplingState:
    """The loop state after sampling the first token from the prompt's last logits."""
    b = first_logits_BV.shape[0]
    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        tokens_BN=jnp.full((b, buffer), pad_id, jnp.int32),
        next_B=jnp.zeros((b,), jnp.int32),
        done_B=max_new_B <= 0,
        num_B=jnp.zeros((b,), jnp.int32),
        carry=carry,
    )
    token_B = sample_logits(first_logits_BV, jax.random.fold_in(key, 0), chain)
    return _emit(state, token_B, max_new_B, stop_BS, pad_id)


def continue_loop(
    decode_fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    state: SamplingState,
    key: jax.Array,
    chain: Sequence[Strategy],
    max_new_B: jax.Array,
    stop_BS: jax.Array,
    pad_id: int,
    until: jax.Array | int,
) -> SamplingState:
    """Decode (`decode_fn(tokens_B, carry) -> (logits_BV, carry)`) inside one `lax.while_loop`
    until `until` tokens are generated or every row is done. Step s samples with
    `fold_in(key, s)`, so splitting the loop into pieces does not change the tokens."""

    def cond(s: SamplingState) -> jax.Array:
        return (s.step < until) & ~jnp.all(s.done_B)

    def body(s: SamplingState) -> SamplingState:
        logits_BV, carry = decode_fn(s.next_B, s.carry)
        token_B = sample_logits(logits_BV, jax.random.fold_in(key, s.step), chain)
        return _emit(dataclasses.replace(s, carry=carry), token_B, max_new_B, stop_BS, pad_id)

    return jax.lax.while_loop(cond, body, state)


def _model_start(
    params, prompt_BT, lengths_B, key, max_new_B, stop_BS, config, chain, buffer, cache_len, pad_id
):
    logits_BV, cache = prefill_cache(config, params, prompt_BT, lengths_B, cache_len)
    return start_loop(logits_BV, cache, key, chain, max_new_B, stop_BS, pad_id, buffer)


def _model_continue(params, state, key, max_new_B, stop_BS, until, config, chain, pad_id):
    def decode_fn(tokens_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return decode_step(config, params, tokens_B, cache)

    return continue_loop(decode_fn, state, key, chain, max_new_B, stop_BS, pad_id, until)


_STATIC = ("config", "chain", "buffer", "cache_len", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(
    params,
    prompt_BT,
    lengths_B,
    key,
    max_new_B,
    stop_BS,
    *,
    config,
    chain,
    buffer,
    cache_len,
    pad_id,
):
    state = _model_start(
        params,
        prompt_BT,
        lengths_B,
        key,
        max_new_B,
        stop_BS,
        config,
        chain,
        buffer,
        cache_len,
        pad_id,
    )
    state = _model_continue(params, state, key, max_new_B, stop_BS, buffer, config, chain, pad_id)
    return state.tokens_BN, state.num_B


_stream_start = jax.jit(_model_start, static_argnums=range(6, 11))
_stream_chunk = jax.jit(_model_continue, static_argnums=(6, 7, 8), donate_argnums=1)


# --- the Python entry points -------------------------------------------------------------------

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket(n: int, limit: int) -> int:
    """The smallest bucket >= n (capped at `limit`), so new prompt lengths rarely recompile."""
    for b in BUCKETS:
        if b >= n:
            return min(b, limit)
    return limit


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A batch of token-id prompts, validated and padded for `generate`."""

    tokens: np.ndarray  # [B, T] right-padded, T a bucket
    lengths: np.ndarray  # [B]
    max_new: np.ndarray  # [B]
    stop: np.ndarray  # [B, S], -1 = none
    buffer: int  # static number of generated-token slots
    cache_len: int


def _key(key: Any) -> jax.Array:
    """An int seed or a JAX PRNG key, as a key."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)  # a raw jax.random.PRNGKey
    raise ValueError(f"key={key!r:.60}: expected an int seed or a jax.random.key")


@functools.lru_cache(maxsize=16)
def _param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_params(config)))
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in leaves}


def _check_params(config: ModelConfig, params: Any) -> None:
    """A clear error when `params` are not this `config`'s (another model, a wrapped tree)."""
    want = _param_shapes(config)
    got = {
        jax.tree_util.keystr(p): tuple(np.shape(x))
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    if got != want:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        name = diff[0]
        raise ValueError(
            f"params do not match this ModelConfig: {name} is {got.get(name, 'missing')} in "
            f"params, {want.get(name, 'absent')} for the config (another model's parameters?)"
        )


def _is_scalar(x: Any) -> bool:
    return not isinstance(x, str) and np.ndim(x) == 0


def _ints(values: Sequence[Any], what: str) -> list[int]:
    """`values` as Python ints; an error naming the first that is not an integer (1.5, "3")."""
    out = []
    for x in values:
        if isinstance(x, bool | np.bool_):
            raise ValueError(f"{what} holds {x!r}: expected integers")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise ValueError(
                f"{what} holds {x!r} ({type(x).__name__}): expected integers"
            ) from None
    return out


def _ids(values: Sequence[Any], what: str, vocab_size: int) -> list[int]:
    """Token ids as Python ints, each in [0, vocab_size)."""
    ids = _ints(values, what)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return ids


def prepare(
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
) -> Prompts:
    """Validate prompts (non-empty, ids in the vocabulary, prompt + new tokens within
    model.max_seq_len) and pad them to buckets."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    prompts = [np.asarray(p).reshape(-1).tolist() if hasattr(p, "shape") else p for p in prompts]
    b = len(prompts)
    v, limit = config.vocab_size, config.max_seq_len - config.prompt_tokens
    if _is_scalar(max_new_tokens):
        max_new = _ints([max_new_tokens], "max_new_tokens") * b
    else:
        max_new = _ints(max_new_tokens, "max_new_tokens")  # type: ignore[arg-type]
    if len(max_new) != b:
        raise ValueError(f"max_new_tokens has {len(max_new)} entries for {b} prompts")
    if len(stop_tokens) and _is_scalar(stop_tokens[0]):
        stop = [_ids(stop_tokens, "stop_tokens", v)] * b  # type: ignore[arg-type]
    else:
        stop = [_ids(s, f"stop_tokens row {i}", v) for i, s in enumerate(stop_tokens)]  # type: ignore[arg-type]
        stop = stop or [[] for _ in range(b)]
    if len(stop) != b:
        raise ValueError(f"stop_tokens has {len(stop)} rows for {b} prompts")
    _ids([pad_id], "pad_id", v)
    # Prompt-tuning embeddings take the first slots of every row.
    for i, (p, n) in enumerate(zip(prompts, max_new, strict=True)):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        p = _ids(p, f"prompt {i}", v)
        if n < 1:
            raise ValueError(f"max_new_tokens={n} (prompt {i}) must be >= 1")
        if len(p) + n > limit:
            fix = (
                f"shorten the prompt or ask for at most {limit - len(p)} new tokens"
                if len(p) < limit
                else f"shorten the prompt to at most {limit - 1} tokens"
            )
            raise ValueError(
                f"prompt {i} has {len(p)} tokens + max_new_tokens={n} = {len(p) + n}, more than "
                f"model.max_seq_len={limit}; {fix}"
            )
    longest = max(len(p) for p in prompts)
    t = bucket(longest, limit)
    buffer = bucket(max(max_new), limit)
    cache_len = min(bucket(t + buffer, 2 * limit), limit) + config.prompt_tokens
    tokens = np.full((b, t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    width = max(1, max(len(s) for s in stop))
    stop_arr = np.full((b, width), -1, np.int32)
    for i, s in enumerate(stop):
        stop_arr[i, : len(s)] = s
    return Prompts(
        tokens=tokens,
        lengths=np.asarray([len(p) for p in prompts], np.int32),
        max_new=np.asarray(max_new, np.int32),
        stop=stop_arr,
        buffer=buffer,
        cache_len=cache_len,
    )


def _check_chain(chain: Sequence[Strategy], config: ModelConfig) -> tuple[Strategy, ...]:
    if config.head != "lm":
        raise ValueError(
            f"model.head={config.head!r}: this model scores sequences (`jaxlm score`), it has no "
            "vocabulary to sample from"
        )
    if not config.causal:
        raise ValueError(
            "model.causal=False: a bidirectional model does not predict the next token and "
            "cannot decode with a KV cache; it fills masks instead"
        )
    chain = tuple(chain)
    for s in chain:
        if not isinstance(s, Strategy):
            raise ValueError(f"{s!r} is not a sampling strategy (Greedy, Temperature, TopK, ...)")
        if isinstance(s, TopK) and s.k > config.vocab_size:
            raise ValueError(
                f"top_k={s.k} is more than the model's {config.vocab_size} token ids; use at most "
                f"{config.vocab_size} (or no top-k)"
            )
    return chain


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    key: jax.Array | int = 0,
    chain: Sequence[Strategy] = (Greedy(),),
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """The generated tokens of each prompt (a stop token, when produced, ends the row and is
    included). The whole loop runs in one compiled `lax.while_loop`; prompt lengths and token
    budgets are padded to buckets, so similar requests reuse one compilation."""
    chain = _check_chain(chain, config)
    batch = prepare(config, prompts, max_new_tokens, stop_tokens, pad_id)
    key = _key(key)
    _check_params(config, params)
    tokens, num = _generate(
        params,
        batch.tokens,
        batch.lengths,
        key,
        batch.max_new,
        batch.stop,
        config=config,
        chain=chain,
        buffer=batch.buffer,
        cache_len=batch.cache_len,
        pad_id=pad_id,
    )
    tokens, num = to_host(tokens), to_host(num)
    return [tokens[i, : num[i]].tolist() for i in range(len(prompts))]


def generate_stream(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    key: jax.Array | int = 0,
    chain: Sequence[Strategy] = (Greedy(),),
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    chunk: int = 8,
) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields each row's newly generated tokens every `chunk` decode steps
    (a compiled loop per chunk); the concatenated chunks equal `generate`'s result."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    chain = _check_chain(chain, config)
    batch = prepare(config, prompts, max_new_tokens, stop_tokens, pad_id)
    key = _key(key)
    _check_params(config, params)
    args = (batch.max_new, batch.stop)
    state = _stream_start(
        params,
        batch.tokens,
        batch.lengths,
        key,
        *args,
        config,
        chain,
        batch.buffer,
        batch.cache_len,
        pad_id,
    )
    sent = np.zeros(len(prompts), np.int64)
    while True:
        tokens, num, done = (to_host(x) for x in (state.tokens_BN, state.num_B, state.done_B))
        new = [tokens[i, sent[i] : num[i]].tolist() for i in range(len(prompts))]
        sent = num.astype(np.int64)
        if any(new):
            yield new
        if done.all() or int(state.step) >= batch.buffer:
            return
        until = jnp.asarray(min(int(state.step) + chunk, batch.buffer), jnp.int32)
        state = _stream_chunk(params, state, key, *args, until, config, chain, pad_id)


def greedy_without_cache(
    config: ModelConfig, params: Any, prompt: Sequence[int], max_new_tokens: int
) -> list[int]:
    """`prompt` followed by up to `max_new_tokens` greedy tokens, recomputing the whole sequence
    each step (no KV cache): a reference and a baseline for the cached loop."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    prompt = _ids(prompt, "the prompt", config.vocab_size)
    length = min(len(prompt) + max_new_tokens, config.max_seq_len - config.prompt_tokens)
    if len(prompt) >= length:
        return list(prompt)[:length]
    tokens = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    return [int(t) for t in _greedy_nocache(config, params, tokens, len(prompt))[0]]


@functools.partial(jax.jit, static_argnames=("config", "prompt_len"))
def _greedy_nocache(config: ModelConfig, params: Any, tokens_1L, prompt_len: int) -> jax.Array:
    length = tokens_1L.shape[1]

    def body(i: int, tokens: jax.Array) -> jax.Array:
        # Positions not yet written are segment 0 (padding), so they never influence position i-1.
        segments = (jnp.arange(length) < i).astype(jnp.int32)[None]
        prefix = (jnp.arange(length) < prompt_len)[None] if config.prefix_lm else None
        logits = Transformer(config).apply(
            {"params": params}, tokens, segment_ids_BT=segments, prefix_BT=prefix
        )[0]
        next_token = jnp.argmax(logits[0, i - 1]).astype(tokens.dtype)
        return tokens.at[0, i].set(next_token)

    return jax.lax.fori_loop(prompt_len, length, body, tokens_1L)
