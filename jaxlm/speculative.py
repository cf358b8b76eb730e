"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them in one forward.

Each round, for every row, the drafter proposes d_1 .. d_k, and the target model runs once over
[last token, d_1 .. d_k], giving its next-token distributions p_1 .. p_{k+1}. Draft token d_i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)) (q_i: the drafter's distribution) until
the first rejection, at which a replacement is drawn from max(0, p_i - q_i), renormalised; when
all k are accepted, a bonus token is drawn from p_{k+1}. This is the standard rule (Leviathan et
al. 2023; Chen et al. 2023): every emitted token is distributed exactly as the target's own
sampling (after the same temperature / top-k / top-p), and greedy output equals the target's.

Drafters:
- `Draft(config, params)`: a smaller model with the same vocabulary, decoding from its own cache.
- `"ngram"` (prompt lookup): the k tokens that followed the latest earlier occurrence of the
  sequence's last n tokens (n = `ngram` down to 1), in the prompt or the output so far (a copy
  that reaches the end continues with itself); q is a point mass on them. Needs no second
  model; it pays off when the output repeats its input (code edits, extraction, quoting).

Rows advance by different amounts (accepted + 1 each round); each row's caches keep their own
lengths, so ragged prompts, per-row budgets and stop tokens work as in `sample.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm import sample
from jaxlm.configs.model import ModelConfig
from jaxlm.distributed import to_host
from jaxlm.model.kv_cache import KVCache, init_cache
from jaxlm.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Draft:
    """A draft model: its config (same vocabulary as the target's) and parameters."""

    config: ModelConfig
    params: Any

    def __hash__(self) -> int:  # the parameters travel as arguments, not in the static key
        return hash(self.config)


class Result(NamedTuple):
    tokens: list[list[int]]
    acceptance: float  # accepted draft tokens / proposed, over live rows
    tokens_per_round: float  # emitted tokens per target forward, per live row


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    round: jax.Array  # scalar
    tokens_BN: jax.Array  # emitted tokens
    num_B: jax.Array
    done_B: jax.Array
    last_B: jax.Array  # the newest emitted token, not yet in the caches
    seq_BL: jax.Array  # prompt + emitted tokens (for prompt lookup), seq_len_B of them
    seq_len_B: jax.Array
    cache: KVCache
    draft_cache: KVCache | None
    proposed: jax.Array  # scalar counts over live rows
    accepted: jax.Array
    emitted: jax.Array
    live_rounds: jax.Array


def _probs(logits: jax.Array, chain: tuple) -> jax.Array:
    """The sampling distribution after `chain` ([..., V] float32; one-hot argmax when greedy)."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1]).astype(jnp.float32)
    if sample._is_greedy(chain):
        return jax.nn.one_hot(jnp.argmax(flat, -1), shape[-1]).reshape(shape)
    return jax.nn.softmax(sample.filtered_logits(flat, chain), -1).reshape(shape)


def _lookup(seq_BL: jax.Array, len_B: jax.Array, k: int, ngram: int) -> jax.Array:
    """[B, k] proposals: what followed the latest earlier match of the last n tokens (the
    largest n <= `ngram` that matches); the last token repeated where nothing matches."""
    b, length = seq_BL.shape
    idx_L = jnp.arange(length)
    last_B = jnp.take_along_axis(seq_BL, (len_B - 1)[:, None], 1)[:, 0]
    start_B = jnp.full((b,), -1, jnp.int32)
    for n in range(ngram, 0, -1):
        # Window s matches when seq[s + j] == seq[len - n + j] for j < n, and s + n < len.
        match_BL = (idx_L[None] + n < len_B[:, None]) & (len_B[:, None] >= n + 1)
        for j in range(n):
            want_B = jnp.take_along_axis(seq_BL, (len_B - n + j)[:, None], 1)
            shifted = jnp.roll(seq_BL, -j, axis=1)
            match_BL &= shifted == want_B
        latest_B = jnp.max(jnp.where(match_BL, idx_L[None] + n, -1), axis=1)
        start_B = jnp.where(start_B < 0, latest_B, start_B)
    # Past the sequence's end the copy continues with itself (the proposals so far), so a
    # repeating pattern is proposed whole: position start + (i mod (len - start)).
    period_B1 = jnp.maximum(len_B - start_B, 1)[:, None]
    pos_BK = start_B[:, None] + jnp.arange(k)[None] % period_B1
    ok_BK = (start_B[:, None] >= 0) & (pos_BK < len_B[:, None])
    got_BK = jnp.take_along_axis(seq_BL, jnp.clip(pos_BK, 0, length - 1), 1)
    return jnp.where(ok_BK, got_BK, last_B[:, None]).astype(jnp.int32)


def _round(state, key, params, draft_params, max_new_B, stop_BS, *, config, draft, chain, k,
           ngram, pad_id):  # fmt: skip
    b = state.last_B.shape[0]
    v = config.vocab_size
    key = jax.random.fold_in(key, state.round)
    k_draft, k_accept, k_fix = jax.random.split(key, 3)
    start_B = state.cache.lengths
    # 1. Proposals d_1..d_k and the drafter's distributions q_1..q_k.
    if draft is None:
        d_BK = _lookup(state.seq_BL, state.seq_len_B, k, ngram)
        q_BKV = jax.nn.one_hot(d_BK, v)
        draft_cache = None
    else:
        dcfg = draft.config

        def step(carry, i):
            tok_B, dcache = carry
            logits_BV, dcache = sample.decode_step(dcfg, draft_params, tok_B, dcache)
            q_BV = _probs(logits_BV, chain)
            if sample._is_greedy(chain):
                nxt_B = jnp.argmax(q_BV, -1).astype(jnp.int32)
            else:
                nxt_B = jax.random.categorical(
                    jax.random.fold_in(k_draft, i), jnp.log(q_BV)
                ).astype(jnp.int32)
            return (nxt_B, dcache), (nxt_B, q_BV)

        # k + 1 steps: the last one feeds d_k, so the draft cache holds every accepted token.
        dstart_B = state.draft_cache.lengths
        (_, draft_cache), (d_KB, q_KBV) = jax.lax.scan(
            step, (state.last_B, state.draft_cache), jnp.arange(k + 1)
        )
        d_BK, q_BKV = d_KB[:k].T, jnp.swapaxes(q_KBV[:k], 0, 1)
    # 2. The target over [last, d_1..d_k]: p_1..p_{k+1}.
    fed_BT = jnp.concatenate([state.last_B[:, None], d_BK], axis=1)
    logits_BTV, cache, _ = Transformer(config).apply({"params": params}, fed_BT, cache=state.cache)
    p_BTV = _probs(logits_BTV, chain)
    # 3. Accept the longest prefix that passes, then a replacement or the bonus token.
    p_d_BK = jnp.take_along_axis(p_BTV[:, :k], d_BK[..., None], -1)[..., 0]
    q_d_BK = jnp.take_along_axis(q_BKV, d_BK[..., None], -1)[..., 0]
    if sample._is_greedy(chain):
        ok_BK = p_d_BK > 0  # one-hot: d is the target's argmax
    else:
        u_BK = jax.random.uniform(k_accept, (b, k))
        ok_BK = u_BK * q_d_BK < p_d_BK
    a_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
    p_a_BV = jnp.take_along_axis(p_BTV, a_B[:, None, None], 1)[:, 0]
    q_pad_BTV = jnp.concatenate([q_BKV, jnp.zeros((b, 1, v))], axis=1)  # no draft for the bonus
    q_a_BV = jnp.take_along_axis(q_pad_BTV, a_B[:, None, None], 1)[:, 0]
    residual_BV = jnp.maximum(p_a_BV - q_a_BV, 0.0)
    total_B1 = jnp.sum(residual_BV, -1, keepdims=True)
    residual_BV = jnp.where(total_B1 > 0, residual_BV / jnp.maximum(total_B1, 1e-30), p_a_BV)
    if sample._is_greedy(chain):
        new_B = jnp.argmax(p_a_BV, -1).astype(jnp.int32)
    else:
        new_B = jax.random.categorical(k_fix, jnp.log(residual_BV)).astype(jnp.int32)
    # 4. Emit d_1..d_a, new (cut at a stop token or the row's budget).
    emit_BT = jnp.concatenate([d_BK, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emit_BT = jnp.where(jnp.arange(k + 1)[None] == a_B[:, None], new_B[:, None], emit_BT)
    count_B = a_B + 1
    stop_BT = jnp.any(emit_BT[..., None] == stop_BS[:, None, :], -1)
    stop_BT &= jnp.arange(k + 1)[None] < count_B[:, None]
    first_stop_B = jnp.argmax(stop_BT, axis=1)
    count_B = jnp.where(jnp.any(stop_BT, 1), first_stop_B + 1, count_B)
    count_B = jnp.minimum(count_B, max_new_B - state.num_B)
    live_B = ~state.done_B
    count_B = jnp.where(live_B, count_B, 0)
    rows_B1 = jnp.arange(b)[:, None]
    slot_BT = state.num_B[:, None] + jnp.arange(k + 1)[None]
    slot_BT = jnp.where(jnp.arange(k + 1)[None] < count_B[:, None], slot_BT, -1)
    tokens_BN = state.tokens_BN.at[rows_B1, slot_BT].set(emit_BT, mode="drop")
    seq_slot_BT = jnp.where(slot_BT >= 0, state.seq_len_B[:, None] + jnp.arange(k + 1)[None], -1)
    seq_BL = state.seq_BL.at[rows_B1, seq_slot_BT].set(emit_BT, mode="drop")
    num_B = state.num_B + count_B
    done_B = state.done_B | jnp.any(stop_BT, 1) | (num_B >= max_new_B)
    # The caches keep [last, d_1..d_a]; `new` is fed next round.
    cache = cache.replace(lengths=start_B + jnp.where(live_B, a_B + 1, 0))
    if draft is not None:
        draft_cache = draft_cache.replace(lengths=dstart_B + jnp.where(live_B, a_B + 1, 0))
    live = jnp.sum(live_B)
    return _State(
        round=state.round + 1,
        tokens_BN=tokens_BN,
        num_B=num_B,
        done_B=done_B,
        last_B=jnp.where(live_B, new_B, state.last_B),
        seq_BL=seq_BL,
        seq_len_B=state.seq_len_B + count_B,
        cache=cache,
        draft_cache=draft_cache,
        proposed=state.proposed + k * live,
        accepted=state.accepted + jnp.sum(jnp.where(live_B, a_B, 0)),
        emitted=state.emitted + jnp.sum(count_B),
        live_rounds=state.live_rounds + live,
    )


_STATIC = ("config", "draft", "chain", "k", "ngram", "buffer", "cache_len", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _speculative(params, draft_params, prompt_BT, lengths_B, key, max_new_B, stop_BS, *, config,
                 draft, chain, k, ngram, buffer, cache_len, pad_id):  # fmt: skip
    b, t = prompt_BT.shape
    # The first token comes from the prefill, as in `generate` (step 0's key).
    logits_BV, cache = sample.prefill_cache(config, params, prompt_BT, lengths_B, cache_len)
    first_B = sample.sample_logits(logits_BV, jax.random.fold_in(key, 0), chain)
    draft_cache = None
    if draft is not None:
        draft_cache = init_cache(draft.config, b, cache_len)
        _, draft_cache = sample.prefill(draft.config, draft_params, prompt_BT, lengths_B,
                                        draft_cache)  # fmt: skip
    length = t + buffer + k + 1
    seq_BL = jnp.zeros((b, length), jnp.int32).at[:, :t].set(prompt_BT)
    seq_BL = seq_BL.at[jnp.arange(b), lengths_B].set(first_B)
    tokens_BN = jnp.full((b, buffer + k + 1), pad_id, jnp.int32).at[:, 0].set(first_B)
    stopped_B = jnp.any(first_B[:, None] == stop_BS, -1)
    zero = jnp.zeros((), jnp.int32)
    state = _State(
        round=jnp.ones((), jnp.int32),
        tokens_BN=tokens_BN,
        num_B=jnp.ones((b,), jnp.int32),
        done_B=stopped_B | (max_new_B <= 1),
        last_B=first_B,
        seq_BL=seq_BL,
        seq_len_B=lengths_B + 1,
        cache=cache,
        draft_cache=draft_cache,
        proposed=zero,
        accepted=zero,
        emitted=zero,
        live_rounds=zero,
    )
    body = functools.partial(
        _round, key=key, params=params, draft_params=draft_params, max_new_B=max_new_B,
        stop_BS=stop_BS, config=config, draft=draft, chain=chain, k=k, ngram=ngram, pad_id=pad_id,
    )  # fmt: skip
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)
    return state.tokens_BN, state.num_B, (state.proposed, state.accepted, state.emitted,
                                          state.live_rounds)  # fmt: skip


def generate_speculative(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    draft: Draft | str = "ngram",
    k: int = 4,
    key: jax.Array | int = 0,
    chain: Sequence[sample.Strategy] = (sample.Greedy(),),
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    ngram: int = 3,
) -> Result:
    """`sample.generate` with speculative decoding: the same greedy tokens, and with sampling
    the same distribution, in fewer target forwards when drafts are accepted. `draft` is a
    `Draft` (a smaller model with the target's vocabulary) or "ngram" (prompt lookup)."""
    chain = sample._check_chain(chain, config)
    if not (isinstance(k, int) and 1 <= k <= 16):
        raise ValueError(f"k={k!r} draft tokens per round must be an integer in [1, 16]")
    if not (isinstance(ngram, int) and 1 <= ngram <= 8):
        raise ValueError(f"ngram={ngram!r} must be an integer in [1, 8]")
    if isinstance(draft, str):
        if draft != "ngram":
            raise ValueError(f"draft={draft!r}: give a Draft(config, params) or 'ngram'")
        spec: Draft | None = None
        draft_params = None
    elif isinstance(draft, Draft):
        if draft.config.vocab_size != config.vocab_size:
            raise ValueError(
                f"the draft model's vocab_size {draft.config.vocab_size} differs from the "
                f"target's {config.vocab_size}: a draft must share the target's tokenizer"
            )
        sample._check_chain(chain, draft.config)
        sample._check_params(draft.config, draft.params)
        spec, draft_params = Draft(draft.config, None), draft.params
    else:
        raise ValueError(f"draft={draft!r:.60}: give a Draft(config, params) or 'ngram'")
    batch = sample.prepare(config, prompts, max_new_tokens, stop_tokens, pad_id)
    if config.prompt_tokens or (spec is not None and spec.config.prompt_tokens):
        raise ValueError("speculative decoding does not take prompt-tuned models")
    limit = config.max_seq_len
    if spec is not None:
        limit = min(limit, spec.config.max_seq_len)
    cache_len = min(batch.tokens.shape[1] + batch.buffer + k + 1, limit)
    if sample.uses_ring(config, cache_len) or (
        spec is not None and sample.uses_ring(spec.config, cache_len)
    ):
        raise ValueError(
            "speculative decoding checks k + 1 tokens per call, which a sliding-window model's "
            "ring-buffer cache does not take; use sample.generate"
        )
    sample._check_params(config, params)
    tokens, num, stats = _speculative(
        params, draft_params, batch.tokens, batch.lengths, sample._key(key), batch.max_new,
        batch.stop, config=config, draft=spec, chain=chain, k=k, ngram=ngram,
        buffer=batch.buffer, cache_len=cache_len, pad_id=pad_id,
    )  # fmt: skip
    tokens, num = to_host(tokens), to_host(num)
    proposed, accepted, emitted, rounds = (int(x) for x in stats)
    return Result(
        tokens=[tokens[i, : num[i]].tolist() for i in range(len(prompts))],
        acceptance=accepted / max(proposed, 1),
        tokens_per_round=emitted / max(rounds, 1),
    )
