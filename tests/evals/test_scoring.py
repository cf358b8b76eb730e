"""Continuation scoring against a NumPy forward pass: summed log-probs, greedy flags, left
truncation, a prefix LM's prefix, batches split over 8 devices, and rolling windows against
lm-evaluation-harness's own window function."""

import jax
import numpy as np
import pytest

from jaxlm.configs.overrides import load_config
from jaxlm.evals.scoring import (
    context_window,
    pack_rows,
    rolling_windows,
    score_continuations,
    score_documents,
)
from jaxlm.model.transformer import param_shardings
from jaxlm.sharding import make_mesh, use_mesh
from tests import numpy_reference
from tests.random_params import random_params

WINDOW = 48
CFG = load_config("tiny", [f"model.max_seq_len={WINDOW}", "model.scan_layers=false"]).model


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=3)


def _logprobs(params, inputs, cfg=CFG, prefix=None):
    """log-softmax [T, V] of one row, float64 NumPy."""
    prefix_BT = None if prefix is None else np.asarray([prefix])
    logits = numpy_reference.forward(params, np.asarray([inputs]), cfg, prefix_BT=prefix_BT)[0]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference(params, context, continuation, cfg=CFG, prefix_lm=False):
    """(summed log-prob, greedy) by a full forward of the row, cut to the window by hand."""
    whole = list(context) + list(continuation)
    inputs = whole[:-1][-context_window(cfg) :]
    start = len(whole) - 1 - len(inputs)
    prefix = [start + j < len(context) for j in range(len(inputs))] if prefix_lm else None
    logp = _logprobs(params, inputs, cfg, prefix)[-len(continuation) :]
    picked = logp[np.arange(len(continuation)), continuation]
    return picked.sum(), bool((logp.argmax(-1) == continuation).all())


def _greedy_chain(params, context, n):
    """The argmax continuation of `context`, n tokens, by repeated full forwards."""
    out = list(context)
    for _ in range(n):
        out.append(int(_logprobs(params, out)[-1].argmax()))
    return out[len(context) :]


def _requests(params, rng):
    reqs = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (12, 9), (30, 2), (44, 4), (47, 6), (60, 5), (2, 30)]:
        reqs.append((rng.integers(3, 259, n_ctx).tolist(), rng.integers(3, 259, n_cont).tolist()))
    # Continuations greedy decoding produces, short and past the window.
    for ctx_len in (7, 50):
        ctx = rng.integers(3, 259, ctx_len).tolist()
        reqs.append((ctx, _greedy_chain(params, ctx[-(WINDOW - 2) :], 3)))  # as scored
    return reqs


def test_scores_equal_a_full_forward_per_request(params):
    reqs = _requests(params, np.random.default_rng(0))
    scores = score_continuations(CFG, params, reqs, batch_size=4)
    for (ctx, cont), s in zip(reqs, scores, strict=True):
        logprob, greedy = _reference(params, ctx, cont)
        np.testing.assert_allclose(s.logprob, logprob, rtol=1e-5, atol=2e-4)
        assert s.greedy == greedy
        assert s.truncated == (len(ctx) + len(cont) - 1 > WINDOW)
    assert [s.greedy for s in scores[-2:]] == [True, True]
    assert not any(s.greedy for s in scores[:-2])  # random continuations are not the argmax
    assert sum(s.truncated for s in scores) == 3
    # One request per row (no packing) scores the same.
    alone = score_continuations(CFG, params, reqs, batch_size=3, pack=False)
    np.testing.assert_allclose(
        [s.logprob for s in alone], [s.logprob for s in scores], rtol=1e-5, atol=1e-4
    )
    assert [s.greedy for s in alone] == [s.greedy for s in scores]


def test_rows_pack_requests_first_fit_within_the_window():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 49, 200).tolist()
    rows = pack_rows(lengths, 48)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 48 for row in rows)
    # Close to the fewest rows the tokens need (first fit, longest first).
    assert len(rows) <= 1.1 * sum(lengths) / 48 + 2
    longest_first = np.argsort(-np.asarray(lengths), kind="stable")
    assert pack_rows(lengths, 48, pack=False) == [[int(i)] for i in longest_first]


def _choices(rng, contexts=(3, 20, 45, 60), choices=(2, 4, 3, 5)):
    """Multiple-choice-like requests: several continuations per context (the last context
    is cut to fit for its longer choices, so those leave the shared path)."""
    reqs = []
    for n_ctx, k in zip(contexts, choices, strict=True):
        ctx = rng.integers(3, 259, n_ctx).tolist()
        reqs += [(ctx, rng.integers(3, 259, rng.integers(1, 9)).tolist()) for _ in range(k)]
    return reqs


def test_shared_contexts_run_once_and_score_as_a_full_forward(params):
    reqs = _choices(np.random.default_rng(8))
    scores = score_continuations(CFG, params, reqs, batch_size=2)
    for (ctx, cont), s in zip(reqs, scores, strict=True):
        logprob, greedy = _reference(params, ctx, cont)
        np.testing.assert_allclose(s.logprob, logprob, rtol=1e-5, atol=2e-4)
        assert s.greedy == greedy
    alone = score_continuations(CFG, params, reqs, batch_size=2, share_contexts=False)
    np.testing.assert_allclose(
        [s.logprob for s in alone], [s.logprob for s in scores], rtol=1e-5, atol=1e-4
    )


def test_shared_contexts_with_prompt_tuning_match_packed_rows():
    cfg = load_config(
        "tiny", [f"model.max_seq_len={WINDOW}", "model.prompt_tokens=4", "model.scan_layers=false"]
    ).model
    params = random_params(cfg, seed=6)
    reqs = _choices(np.random.default_rng(9), contexts=(3, 20, 40), choices=(2, 4, 3))
    shared = score_continuations(cfg, params, reqs, batch_size=2)
    packed = score_continuations(cfg, params, reqs, batch_size=2, share_contexts=False)
    np.testing.assert_allclose(
        [s.logprob for s in shared], [s.logprob for s in packed], rtol=1e-5, atol=1e-4
    )


def test_batches_split_over_eight_devices_score_the_same(params):
    reqs = _requests(params, np.random.default_rng(1)) + _choices(np.random.default_rng(1))
    mesh = make_mesh(load_config("tiny", ["mesh.fsdp=8"]).mesh)
    sharded = jax.device_put(params, param_shardings(CFG, mesh, "fsdp_tp"))
    with use_mesh(mesh, "fsdp_tp"):
        split = score_continuations(CFG, sharded, reqs, batch_size=8, mesh=mesh)
    whole = score_continuations(CFG, params, reqs, batch_size=3)
    np.testing.assert_allclose(
        [s.logprob for s in split], [s.logprob for s in whole], rtol=1e-5, atol=1e-4
    )
    assert [s.greedy for s in split] == [s.greedy for s in whole]


def test_a_prefix_lm_sees_the_context_as_its_prefix():
    cfg = load_config(
        "tiny", [f"model.max_seq_len={WINDOW}", "model.scan_layers=false", "model.prefix_lm=true"]
    ).model
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(2)
    reqs = [(rng.integers(3, 259, n).tolist(), rng.integers(3, 259, 4).tolist()) for n in (6, 52)]
    reqs += [(reqs[0][0], rng.integers(3, 259, 3).tolist())]  # shares the first context
    scores = score_continuations(cfg, params, reqs, batch_size=2)
    for (ctx, cont), s in zip(reqs, scores, strict=True):
        want, _ = _reference(params, ctx, cont, cfg, prefix_lm=True)
        causal, _ = _reference(params, ctx, cont, cfg)
        np.testing.assert_allclose(s.logprob, want, rtol=1e-5, atol=2e-4)
        assert abs(want - causal) > 1e-2  # the prefix changes the scores


@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_rolling_windows_equal_the_harness_windows(window):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in [0, 1, 2, window - 1, window, window + 1, 3 * window + 2, 37]:
        tokens = list(range(10, 10 + max(n, 0)))
        want = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(tokens, 7, max_seq_len=window, context_len=1)
        ]
        got = rolling_windows(tokens, 7, window)
        assert [(list(a), list(b)) for a, b in want] == got
        assert [t for _, cont in got for t in cont] == tokens  # each token predicted once


def test_documents_score_as_the_sum_of_their_windows(params):
    rng = np.random.default_rng(5)
    docs = [rng.integers(3, 259, n).tolist() for n in (3, WINDOW, 130)]
    totals = score_documents(CFG, params, docs, prefix_id=1, batch_size=4)
    # Short document: one forward of [BOS] + doc.
    logp = _logprobs(params, [1, *docs[0][:-1]])
    np.testing.assert_allclose(totals[0], logp[np.arange(3), docs[0]].sum(), rtol=1e-5)
    # Long one: the harness's windows (each token once, up to WINDOW tokens before it).
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    want = 0.0
    for ctx, cont in map(
        make_disjoint_window,
        get_rolling_token_windows(docs[2], 1, max_seq_len=WINDOW, context_len=1),
    ):
        want += _reference(params, ctx, cont)[0]
    np.testing.assert_allclose(totals[2], want, rtol=1e-5)


def test_bad_requests_are_refused_before_anything_runs(params):
    with pytest.raises(ValueError, match="request 1 has an empty continuation"):
        score_continuations(CFG, params, [([1], [5]), ([1], [])])
    with pytest.raises(ValueError, match="request 0 has an empty context"):
        score_continuations(CFG, params, [([], [5])])
    with pytest.raises(ValueError, match=r"49 tokens, more than the model's context window of 48"):
        score_continuations(CFG, params, [([1], [5] * 49)])
    with pytest.raises(ValueError, match=r"token id 320 outside \[0, 320\)"):
        score_continuations(CFG, params, [([1], [320])])
    with pytest.raises(ValueError, match="batch_size=0 must be"):
        score_continuations(CFG, params, [([1], [5])], batch_size=0)
    encoder = load_config("tiny-bert").model
    with pytest.raises(ValueError, match="needs a causal model"):
        score_continuations(encoder, None, [([1], [5])])


def test_passes_over_the_logits_budget_take_fewer_rows(params, monkeypatch):
    from jaxlm.evals import scoring

    # Room for 2 rows of 16 scored positions: every pass is cut to 1 or 2 rows.
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 2 * 16 * CFG.vocab_size)
    reqs = _requests(params, np.random.default_rng(11)) + _choices(np.random.default_rng(11))
    calls = []
    scores = score_continuations(CFG, params, reqs, batch_size=8, progress=calls.append)
    for (ctx, cont), s in zip(reqs, scores, strict=True):
        want = _reference(params, ctx, cont)[0]
        np.testing.assert_allclose(s.logprob, want, rtol=1e-5, atol=2e-4)
    assert sum(calls) == len(reqs) and len(calls) > len(reqs) / 8
