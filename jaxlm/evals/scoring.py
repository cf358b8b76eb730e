"""Batched log-likelihood scoring of token continuations: what downstream evaluation asks of a
causal model (multiple-choice and cloze tasks score each choice's continuation; perplexity tasks
score whole documents in rolling windows).

Requests are packed several to a row (each its own segment, so it attends and is positioned as
if alone: few padding tokens are computed), rows are grouped into batches of a fixed size, each
padded to a length bucket, so a few programs compile whatever the mix of lengths; the vocabulary
head runs only on the continuation's positions (`Transformer(..., logits_at=)`), so a batch never
holds logits for the whole sequence. Batches are split over the mesh's batch axes when their
size divides it.
No dependency on lm-evaluation-harness: `jaxlm.evals.harness` adapts this to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.configs.model import ModelConfig
from jaxlm.distributed import to_host
from jaxlm.model import kv_cache
from jaxlm.model.transformer import Transformer
from jaxlm.sample import _check_params, bucket
from jaxlm.sharding import BATCH_AXES

# At most this many float32 logits (1 GiB) per pass: a pass whose scored positions times the
# vocabulary would hold more runs fewer rows (a power of two, so few programs compile).
LOGITS_BUDGET = 1 << 28


def _pow2(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at `limit` (scored-position counts)."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def _rows_per_pass(batch_size: int, positions: int, vocab: int) -> int:
    fit = max(LOGITS_BUDGET // (positions * vocab), 1)
    return min(batch_size, 1 << (fit.bit_length() - 1))


class Score(NamedTuple):
    """A continuation's summed log-probability (natural log), whether greedy decoding would
    produce it (every token is the argmax), and whether its context was cut from the left to
    fit the model's window."""

    logprob: float
    greedy: bool
    truncated: bool


def context_window(config: ModelConfig) -> int:
    """Tokens a scored row may hold: `max_seq_len` less the prompt-tuning slots."""
    return config.max_seq_len - config.prompt_tokens


def check_scoring_model(config: ModelConfig) -> None:
    """An error unless `config` is a causal model with a language-model head."""
    if not config.causal:
        raise ValueError(
            "log-likelihood scoring needs a causal model, but model.causal=False (an encoder "
            "does not predict the next token; use fill_mask for masked-LM models)"
        )
    if config.head != "lm":
        raise ValueError(
            f"log-likelihood scoring needs token logits, but model.head={config.head!r}"
        )


class _Row(NamedTuple):
    inputs: list[int]  # the model's input tokens
    targets: list[int]  # the tokens each scored position predicts (the continuation's tail)
    context: int  # how many leading inputs are context (the prefix of a prefix LM)
    truncated: bool


def _row(context: Sequence[int], continuation: Sequence[int], window: int, i: int) -> _Row:
    context, continuation = [int(t) for t in context], [int(t) for t in continuation]
    if not context:
        raise ValueError(
            f"request {i} has an empty context: give at least one token (e.g. the BOS or EOS "
            "token) to condition the first continuation token on"
        )
    if not continuation:
        raise ValueError(f"request {i} has an empty continuation: nothing to score")
    if len(continuation) > window:
        raise ValueError(
            f"request {i}: its continuation has {len(continuation)} tokens, more than the "
            f"model's context window of {window}; it cannot be scored in one forward pass"
        )
    whole = context + continuation
    inputs = whole[:-1][-window:]  # as the harness does: drop context from the left to fit
    start = len(whole) - 1 - len(inputs)
    return _Row(inputs, continuation, max(len(context) - start, 0), start > 0)


@functools.partial(jax.jit, static_argnames=("config",))
def _score_batch(
    params: Any,
    tokens_BT: jax.Array,
    segments_BT: jax.Array,
    prefix_BT: jax.Array,
    at_BK: jax.Array,
    targets_BK: jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array]:
    """(log p(target), target == argmax) at the K scored positions of each row, [B, K]."""
    kwargs = {"prefix_BT": prefix_BT} if config.prefix_lm else {}
    logits_BKV, _, _ = Transformer(config).apply(
        {"params": params}, tokens_BT, None, segments_BT, logits_at=at_BK, **kwargs
    )
    logits_BKV = logits_BKV.astype(jnp.float32)
    logprobs_BKV = jax.nn.log_softmax(logits_BKV, axis=-1)
    token_BK = jnp.take_along_axis(logprobs_BKV, targets_BK[..., None], axis=-1)[..., 0]
    return token_BK, jnp.argmax(logits_BKV, axis=-1) == targets_BK


def _global(x: np.ndarray, mesh: Mesh | None) -> Any:
    """`x` split over the mesh's batch axes (every process passes the whole batch)."""
    if mesh is None:
        return x
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    spec = PartitionSpec(BATCH_AXES) if x.shape[0] % ways == 0 else PartitionSpec()
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def pack_rows(lengths: Sequence[int], capacity: int, pack: bool = True) -> list[list[int]]:
    """Indices of the requests in each packed row: first fit over the requests longest first,
    no row over `capacity` tokens (`pack=False`: one request per row, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not pack:
        return [[i] for i in order]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        # Rows fill in order, so only the newest few can still have room for a short request.
        for j in range(max(len(bins) - 64, 0), len(bins)):
            if room[j] >= n:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def _score_shared_batch(
    params: Any,
    context_BT: jax.Array,
    context_len_B: jax.Array,
    continuation_NT: jax.Array,
    owner_N: jax.Array,
    config: ModelConfig,
    cache_len: int,
) -> tuple[jax.Array, jax.Array]:
    """Continuations N that share B contexts: each context runs once into a KV cache, each
    continuation on a copy of its context's cache row. (log p(target), target == argmax) per
    continuation token, [N, T]."""
    b, t = context_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    prefix_BT = positions_BT < context_len_B[:, None] if config.prefix_lm else None
    model = Transformer(config)
    cache = kv_cache.init_cache(config, b, cache_len)
    last_B1V, cache, _ = model.apply(
        {"params": params},
        context_BT,
        positions_BT,
        cache=cache,
        prefill=True,
        prefix_BT=prefix_BT,
        logits_at=(context_len_B - 1)[:, None],
    )
    lengths_B = context_len_B + config.prompt_tokens  # the right padding is not context
    rows = cache.rows(owner_N, lengths_B[owner_N])
    logits_NTV, _, _ = model.apply({"params": params}, continuation_NT, cache=rows)
    # Token j of a continuation is predicted by the context's last position (j = 0) or by
    # continuation token j - 1.
    logits_NTV = jnp.concatenate([last_B1V[owner_N], logits_NTV[:, :-1]], axis=1)
    logits_NTV = logits_NTV.astype(jnp.float32)
    logprobs_NTV = jax.nn.log_softmax(logits_NTV, axis=-1)
    token_NT = jnp.take_along_axis(logprobs_NTV, continuation_NT[..., None], axis=-1)[..., 0]
    return token_NT, jnp.argmax(logits_NTV, axis=-1) == continuation_NT


def _shared_groups(rows: list[_Row]) -> list[list[int]]:
    """Requests (not cut to fit) that share their whole context, two or more to a context."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        if not r.truncated:
            groups.setdefault(tuple(r.inputs[: r.context]), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _score_shared(
    config: ModelConfig,
    params: Any,
    rows: list[_Row],
    groups: list[list[int]],
    batch_size: int,
    pad_id: int,
    mesh: Mesh | None,
    out: list[Score | None],
    progress: Callable[[int], None] | None,
) -> list[int]:
    """Score `groups` through one context pass each (into `out`); the requests that do not fit
    a shared batch's cache are returned for the packed path."""
    window, p = context_window(config), config.prompt_tokens
    groups = sorted(groups, key=lambda g: -rows[g[0]].context)
    left: list[int] = []
    start = 0
    while start < len(groups):
        batch = groups[start : start + batch_size]
        tc = _pow2(max(len(rows[i].targets) for g in batch for i in g), window)
        per = 1 << (max(len(g) for g in batch) - 1).bit_length()  # choices per context
        contexts_per_pass = _rows_per_pass(batch_size, per * tc, config.vocab_size)
        batch = batch[:contexts_per_pass]
        start += len(batch)
        t = bucket(max(rows[g[0]].context for g in batch), window)
        cache_len = min(t + tc + p, config.max_seq_len)
        # Every continuation (padded to tc) must fit after its context in the cache.
        fits = [g for g in batch if rows[g[0]].context + tc + p <= cache_len]
        left += [i for g in batch if g not in fits for i in g]
        if not fits:
            continue
        b = contexts_per_pass
        contexts = np.full((b, t), pad_id, np.int32)
        context_len = np.ones((b,), np.int32)
        continuations = np.full((b * per, tc), pad_id, np.int32)
        owner = np.zeros((b * per,), np.int32)
        request = np.full((b * per,), -1, np.int64)
        n = 0
        for j, g in enumerate(fits):
            c = rows[g[0]].context
            contexts[j, :c], context_len[j] = rows[g[0]].inputs[:c], c
            for i in g:
                targets = rows[i].targets
                continuations[n, : len(targets)], owner[n], request[n] = targets, j, i
                n += 1
        arrays = [_global(a, mesh) for a in (contexts, context_len, continuations, owner)]
        token_lp, greedy = _score_shared_batch(params, *arrays, config=config, cache_len=cache_len)
        token_lp, greedy = to_host(token_lp).astype(np.float64), to_host(greedy)
        for k in range(n):
            c = len(rows[request[k]].targets)
            out[request[k]] = Score(float(token_lp[k, :c].sum()), bool(greedy[k, :c].all()), False)
        if progress is not None:
            progress(n)
    return left


def score_continuations(
    config: ModelConfig,
    params: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
    pack: bool = True,
    share_contexts: bool = True,
) -> list[Score]:
    """The `Score` of each (context tokens, continuation tokens) request, in request order.

    Requests are packed several to a row (each its own segment: attention and positions as if
    alone), `batch_size` rows per forward pass (fewer where their scored positions times the
    vocabulary would pass `LOGITS_BUDGET` float32 logits), each batch padded to a length
    bucket; the head runs on the continuation positions only. A request longer than the model's
    window keeps its last `window` tokens (context dropped from the left, `Score.truncated`);
    a continuation longer than the window is an error. A prefix LM sees the context as its
    prefix. `mesh`:
    split each batch over its batch axes (run under `jaxlm.sharding.use_mesh`); `progress(n)`
    is called after each batch with the requests done; `pack=False`: one request per row.

    `share_contexts`: requests with the same context (a multiple-choice question's choices) run
    it once: `batch_size` contexts per pass into a KV cache, then every continuation on a copy
    of its context's cache row, so the context is not computed once per choice.
    """
    check_scoring_model(config)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    window = context_window(config)
    rows = [_row(c, x, window, i) for i, (c, x) in enumerate(requests)]
    for i, row in enumerate(rows):
        bad = [t for t in row.inputs + row.targets if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(
                f"request {i} has token id {bad[0]} outside [0, {config.vocab_size}) "
                "(model.vocab_size)"
            )
    if not rows:
        return []
    _check_params(config, params)
    out: list[Score | None] = [None] * len(rows)
    todo = list(range(len(rows)))
    groups = _shared_groups(rows) if share_contexts else []
    if groups:
        shared = {i for g in groups for i in g}
        left = _score_shared(config, params, rows, groups, batch_size, pad_id, mesh, out, progress)
        todo = [i for i in todo if i not in shared] + left
    # Longest first: the largest program compiles (and fails, if memory is short) first.
    lengths = [len(rows[i].inputs) for i in todo]
    packed = [[todo[j] for j in row] for row in pack_rows(lengths, window, pack)]
    start = 0
    while start < len(packed):
        chunk = packed[start : start + batch_size]
        k = _pow2(max(sum(len(rows[i].targets) for i in b) for b in chunk), window)
        n_rows = _rows_per_pass(batch_size, k, config.vocab_size)
        chunk = chunk[:n_rows]
        start += len(chunk)
        t = bucket(max(sum(len(rows[i].inputs) for i in b) for b in chunk), window)
        k = min(k, t)
        tokens = np.full((n_rows, t), pad_id, np.int32)
        segments = np.zeros((n_rows, t), np.int32)
        prefix = np.zeros((n_rows, t), bool)
        at = np.zeros((n_rows, k), np.int32)
        targets = np.zeros((n_rows, k), np.int32)
        owner = np.full((n_rows, k), -1, np.int64)
        for j, members in enumerate(chunk):
            used = scored = 0
            for seg, i in enumerate(members, start=1):
                r = rows[i]
                n, c = len(r.inputs), len(r.targets)
                tokens[j, used : used + n], segments[j, used : used + n] = r.inputs, seg
                prefix[j, used : used + r.context] = True
                at[j, scored : scored + c] = np.arange(used + n - c, used + n)
                targets[j, scored : scored + c] = r.targets
                owner[j, scored : scored + c] = i
                used, scored = used + n, scored + c
        arrays = [_global(a, mesh) for a in (tokens, segments, prefix, at, targets)]
        token_lp, greedy = _score_batch(params, *arrays, config=config)
        token_lp, greedy = to_host(token_lp).astype(np.float64), to_host(greedy)
        valid = owner >= 0
        ids = owner[valid]
        totals = np.bincount(ids, weights=token_lp[valid], minlength=len(rows))
        misses = np.bincount(ids, weights=~greedy[valid], minlength=len(rows))
        for members in chunk:
            for i in members:
                out[i] = Score(float(totals[i]), bool(misses[i] == 0), rows[i].truncated)
        if progress is not None:
            progress(sum(len(m) for m in chunk))
    return out  # type: ignore[return-value]


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, window: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together predict every token of `tokens` exactly once,
    each with as much preceding context as fits in `window` tokens: the first window is
    conditioned on `prefix_id` (BOS or EOS), later ones on the `window` tokens before them.
    The log-likelihood of a document is the sum over its windows (lm-evaluation-harness's
    `loglikelihood_rolling` with one token of minimum context)."""
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    tokens = [int(t) for t in tokens]
    out = []
    done = 0
    while done < len(tokens):
        end = min(done + window, len(tokens))
        # Later windows: up to `window` inputs in all, the tokens before `done` that fit.
        context = [prefix_id] if done == 0 else tokens[max(end - 1 - window, 0) : done]
        out.append((context, tokens[done:end]))
        done = end
    return out


def score_documents(
    config: ModelConfig,
    params: Any,
    documents: Sequence[Sequence[int]],
    prefix_id: int,
    batch_size: int = 16,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """The total log-likelihood of each token document, scored in rolling windows (all windows
    of all documents batched together)."""
    window = context_window(config)
    pieces, owner = [], []
    for i, doc in enumerate(documents):
        for pair in rolling_windows(doc, prefix_id, window):
            pieces.append(pair)
            owner.append(i)
    scores = score_continuations(config, params, pieces, batch_size, pad_id, mesh, progress)
    totals = [0.0] * len(documents)
    for i, s in zip(owner, scores, strict=True):
        totals[i] += s.logprob
    return totals
