"""Speculative decoding: greedy output equal to `generate`, and with sampling the target's own
distribution (a chi-square test against probabilities from full forward passes)."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from jaxlm import sample
from jaxlm.configs import get_preset
from jaxlm.model.transformer import Transformer
from jaxlm.speculative import Draft, generate_speculative
from tests.random_params import random_params
from tests.test_sample import _chi_square_critical

CFG = dataclasses.replace(get_preset("tiny-llama"), max_seq_len=128)
SMALL = dataclasses.replace(CFG, num_layers=1)


@pytest.fixture(scope="module")
def models():
    return random_params(CFG, seed=3), random_params(SMALL, seed=4)


@pytest.mark.parametrize("drafter", ["ngram", "self", "small"])
def test_greedy_output_equals_generate(models, drafter):
    """Ragged prompts, per-row budgets and a stop token; drafts all accepted (the target as
    its own draft), mostly rejected (an unrelated model) or looked up in the prompt."""
    params, small = models
    draft = {"ngram": "ngram", "self": Draft(CFG, params), "small": Draft(SMALL, small)}[drafter]
    prompts = [[1, 40, 41, 42, 40, 41], [1, *range(50, 62)], [7]]
    budgets = [20, 30, 25]
    want = sample.generate(CFG, params, prompts, budgets, stop_tokens=[5])
    got = generate_speculative(CFG, params, prompts, budgets, draft=draft, k=3, stop_tokens=[5])
    assert got.tokens == want
    if drafter == "self":
        assert got.acceptance == 1.0 and got.tokens_per_round > 3


def test_prompt_lookup_accepts_what_repeats():
    """Greedy decoding of this random model falls into a 3-token cycle: prompted with it, the
    looked-up drafts are accepted and rounds emit several tokens."""
    cfg = dataclasses.replace(CFG, num_layers=2)
    params = random_params(cfg, seed=9)
    prompt = [1, 30, 31, 32]
    prompt += sample.generate(cfg, params, [prompt], 90)[0]
    assert prompt[-6:] == prompt[-3:] * 2  # in the cycle
    got = generate_speculative(cfg, params, [prompt], 30, draft="ngram", k=4)
    assert got.tokens == sample.generate(cfg, params, [prompt], 30)
    assert got.acceptance > 0.9 and got.tokens_per_round > 4


def _exact_joint(cfg, params, prompt, n, chain):
    """P(t_1..t_n | prompt) under `chain`, for every sequence, from full forward passes."""
    v = cfg.vocab_size
    seqs = np.asarray(list(itertools.product(range(v), repeat=n)), np.int32)
    tokens = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    logits = Transformer(cfg).apply({"params": params}, tokens)[0]
    logits = np.asarray(logits[:, len(prompt) - 1 : -1], np.float32)  # predicts t_1..t_n
    flat = sample.filtered_logits(logits.reshape(-1, v), chain)
    probs = np.asarray(jax.nn.softmax(flat, -1)).reshape(len(seqs), n, v)
    picked = np.take_along_axis(probs, seqs[..., None], -1)[..., 0]
    return {tuple(s): float(p) for s, p in zip(seqs.tolist(), picked.prod(1), strict=True)}


@pytest.mark.parametrize("drafter", ["small", "ngram"])
def test_sampled_output_has_the_targets_distribution(drafter):
    """Three tokens (the first from the prefill, two through a round of k=2 drafts, accepted,
    replaced or the bonus) over a 6-token vocabulary, 30,000 samples: chi-square against the
    target's exact joint distribution after temperature and top-k."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), vocab_size=6, max_seq_len=32)
    params = random_params(cfg, seed=1, embed_std=2.0)
    draft_cfg = dataclasses.replace(cfg, num_layers=1)
    draft = Draft(draft_cfg, random_params(draft_cfg, seed=2, embed_std=2.0))
    chain = (sample.Temperature(0.7), sample.TopK(5))
    prompt = [1, 3, 2, 3]
    n = 30_000
    got = generate_speculative(
        cfg, params, [prompt] * n, 3, draft=draft if drafter == "small" else "ngram", k=2,
        key=5, chain=chain,
    )  # fmt: skip
    assert 0.03 < got.acceptance < 0.9  # both paths ran (thousands of accepts and rejects)
    counts: dict[tuple, int] = {}
    for t in got.tokens:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    exact = _exact_joint(cfg, params, prompt, 3, chain)
    assert set(counts) <= {s for s, p in exact.items() if p > 0}
    # Cells expected below 5 are pooled into one.
    big = [s for s, p in exact.items() if p * n >= 5]
    obs = [counts.get(s, 0) for s in big] + [n - sum(counts.get(s, 0) for s in big)]
    exp = [exact[s] * n for s in big] + [n - sum(exact[s] * n for s in big)]
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    assert stat < _chi_square_critical(int(keep.sum()) - 1), (stat, int(keep.sum()))


def test_bad_settings_are_refused(models):
    params, _ = models
    other = dataclasses.replace(SMALL, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size 64 differs from the target's 320"):
        generate_speculative(CFG, params, [[1]], 4, draft=Draft(other, None))
    with pytest.raises(ValueError, match=r"k=0 draft tokens per round must be .* \[1, 16\]"):
        generate_speculative(CFG, params, [[1]], 4, k=0)
    with pytest.raises(ValueError, match="draft='medusa'"):
        generate_speculative(CFG, params, [[1]], 4, draft="medusa")
    window = dataclasses.replace(CFG, sliding_window=8)
    with pytest.raises(ValueError, match="ring-buffer cache"):
        generate_speculative(window, params, [[1, 2]], 40)
