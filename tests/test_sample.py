"""Generation: against a no-cache argmax loop, a fake model, NumPy filters and a chi-square test."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sample, sharding
from jaxlm.configs import MeshConfig, get_preset
from jaxlm.model.transformer import Transformer, param_shardings
from jaxlm.sample import Greedy, MinP, Temperature, TopK, TopP, generate, generate_stream
from tests.random_params import random_params

LLAMA = dataclasses.replace(get_preset("tiny-llama"), max_seq_len=64)
GPT2 = dataclasses.replace(get_preset("tiny"), max_seq_len=64, scan_layers=True)


@pytest.fixture(scope="module")
def llama_params():
    return random_params(LLAMA, seed=3)


def _argmax_loop(cfg, params, prompt, n):
    """Reference: a fresh full forward pass on exactly the tokens so far, argmax, repeat."""
    length = cfg.max_seq_len
    # One compiled forward over a fixed length; the tail is segment 0 (padding), which causal
    # attention never lets the real tokens see.
    forward = jax.jit(
        lambda p, t, seg: Transformer(cfg).apply({"params": p}, t, segment_ids_BT=seg)[0]
    )
    seq = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(seq)] = seq
        segments = (np.arange(length) < len(seq)).astype(np.int32)[None]
        logits = forward(params, tokens, segments)
        seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
    return seq[len(prompt) :]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama_unrolled", "gpt2_scanned"])
def test_greedy_generation_equals_an_argmax_loop_without_cache(cfg):
    params = random_params(cfg, seed=3)
    prompt = [1, 40, 41, 42, 43]
    assert generate(cfg, params, [prompt], 8) == [_argmax_loop(cfg, params, prompt, 8)]


def test_mixed_prompt_lengths_give_each_row_what_it_gets_alone(llama_params):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, n).tolist() for n in (1, 9, 4, 17)]
    together = generate(LLAMA, llama_params, prompts, 6)
    for p, got in zip(prompts, together, strict=True):
        assert got == generate(LLAMA, llama_params, [p], 6)[0]
    assert together[1] == _argmax_loop(LLAMA, llama_params, prompts[1], 6)


def test_decode_loop_logic_with_a_fake_model():
    """'Always predict token + 1': rows stop at their stop token (included) or their budget."""
    v = 50

    def fake(tokens_B, calls):
        return jax.nn.one_hot((tokens_B + 1) % v, v) * 10.0, calls + 1

    @jax.jit
    def run(first_B, max_new_B, stop_BS):
        state = sample.start_loop(
            jax.nn.one_hot(first_B, v) * 10.0,
            jnp.zeros((), jnp.int32),
            jax.random.key(0),
            (Greedy(),),
            max_new_B,
            stop_BS,
            pad_id=0,
            buffer=8,
        )
        state = sample.continue_loop(
            fake, state, jax.random.key(0), (Greedy(),), max_new_B, stop_BS, 0, 8
        )
        return state.tokens_BN, state.num_B, state.carry

    tokens, num, calls = run(
        jnp.asarray([10, 20, 30, 45]),
        jnp.asarray([8, 3, 8, 8]),
        jnp.asarray([[13, -1], [-1, -1], [99, 33], [2, -1]]),
    )
    assert np.asarray(tokens).tolist() == [
        [10, 11, 12, 13, 0, 0, 0, 0],  # stop token 13 ends the row, and is kept
        [20, 21, 22, 0, 0, 0, 0, 0],  # its budget of 3
        [30, 31, 32, 33, 0, 0, 0, 0],  # the second of its stop tokens
        [45, 46, 47, 48, 49, 0, 1, 2],  # wraps around the vocabulary, stops at 2
    ]
    assert np.asarray(num).tolist() == [4, 3, 4, 8]
    assert int(calls) == 7  # the loop ran until the longest row was done, not longer


# --- strategies against NumPy ----------------------------------------------------------------

LOGITS = np.log(np.asarray([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02]))


def _allowed(strategy, probs):
    order = np.argsort(-probs)
    if isinstance(strategy, TopK):
        return set(order[: strategy.k].tolist())
    if isinstance(strategy, TopP):
        mass, keep = 0.0, set()
        for i in order:
            keep.add(int(i))
            mass += probs[i]
            if mass >= strategy.p - 1e-9:
                break
        return keep
    if isinstance(strategy, MinP):
        return set(np.nonzero(probs >= strategy.p * probs.max())[0].tolist())
    raise AssertionError(strategy)


def _chi_square_critical(df, z=3.09):
    """Wilson–Hilferty approximation of the chi-square quantile at z (3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "strategy", [TopK(3), TopP(0.6), TopP(0.9), MinP(0.25)], ids=["k3", "p0.6", "p0.9", "min0.25"]
)
def test_filters_sample_only_allowed_tokens_with_renormalised_probabilities(strategy):
    n = 40_000
    probs = np.exp(LOGITS)
    allowed = sorted(_allowed(strategy, probs))
    draws = np.asarray(
        jax.jit(lambda x, k: sample.sample_logits(x, k, (Temperature(1.0), strategy)))(
            jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS))),
            jax.random.key(7),
        )
    )
    assert set(np.unique(draws).tolist()) == set(allowed)
    expected = probs[allowed] / probs[allowed].sum() * n
    observed = np.bincount(draws, minlength=len(LOGITS))[allowed]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(allowed) - 1
    if df:
        assert chi2 < _chi_square_critical(df), (chi2, observed, expected)


def test_temperature_sharpens_like_numpy():
    n = 40_000
    draws = np.asarray(
        sample.sample_logits(
            jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, 8)),
            jax.random.key(1),
            (Temperature(0.5),),
        )
    )
    p = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()
    expected = p * n
    chi2 = float(((np.bincount(draws, minlength=8) - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_critical(7)


# --- the loop as users call it ----------------------------------------------------------------


def test_same_key_same_tokens_and_streaming_equals_one_shot(llama_params):
    chain = sample.strategies(temperature=0.9, top_k=50, top_p=0.95)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 100, 101, 102, 103, 104]]
    kwargs = dict(max_new_tokens=[12, 7, 10], key=42, chain=chain, stop_tokens=[[2], [], [2, 3]])
    a = generate(LLAMA, llama_params, prompts, **kwargs)
    assert a == generate(LLAMA, llama_params, prompts, **kwargs)
    assert a != generate(LLAMA, llama_params, prompts, **{**kwargs, "key": 43})
    chunks = list(generate_stream(LLAMA, llama_params, prompts, **kwargs, chunk=3))
    assert len(chunks) >= 3
    joined = [[t for c in chunks for t in c[i]] for i in range(3)]
    assert joined == a
    assert [len(x) for x in a] == [12, 7, 10] or any(x[-1] in (2, 3) for x in a)


def test_generate_compiles_once_per_bucket(llama_params):
    sample._generate.clear_cache()
    generate(LLAMA, llama_params, [[1, 2, 3]], 5)
    generate(LLAMA, llama_params, [[1, 2, 3, 4, 5, 6, 7]], 5, key=3)  # same buckets (16, 16)
    generate(LLAMA, llama_params, [[4] * 12], 9)
    assert sample._generate._cache_size() == 1
    generate(LLAMA, llama_params, [[4] * 20], 9)  # prompt bucket 32: a second program
    assert sample._generate._cache_size() == 2


@pytest.mark.parametrize(
    "mesh_config",
    [
        MeshConfig(data=2, fsdp=1, tensor=4, rules="fsdp_tp"),
        MeshConfig(data=1, fsdp=8, tensor=1, rules="fsdp"),
    ],
    ids=["data2_tensor4", "fsdp8"],
)
def test_sharded_sampling_gives_the_same_tokens_as_one_device(llama_params, mesh_config):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 100, 101], [1, 8, 8, 8, 8]]
    chain = sample.strategies(temperature=0.7, top_k=20)
    want_greedy = generate(LLAMA, llama_params, prompts, 10)
    want_sampled = generate(LLAMA, llama_params, prompts, 10, key=5, chain=chain)
    mesh = sharding.make_mesh(mesh_config)
    params = jax.device_put(llama_params, param_shardings(LLAMA, mesh, mesh_config.rules))
    with sharding.use_mesh(mesh, mesh_config.rules):
        assert generate(LLAMA, params, prompts, 10) == want_greedy
        assert generate(LLAMA, params, prompts, 10, key=5, chain=chain) == want_sampled


def test_bad_requests_are_refused_before_compiling(llama_params):
    cases = [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (
            dict(prompts=[[1, 320]]),
            r"prompt 0 has token ids \[320\] outside the vocabulary \[0, 320\)",
        ),
        (dict(prompts=[[1, -1]]), r"token ids \[-1\]"),
        (
            dict(prompts=[[1] * 60], max_new_tokens=5),
            "60 tokens \\+ max_new_tokens=5 = 65, more than",
        ),
        (dict(prompts=[[1] * 64], max_new_tokens=1), "shorten the prompt to at most 63 tokens"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=2.5), r"max_new_tokens holds 2.5 \(float\): expected integers"),
        (dict(prompts=[]), "no prompts given"),
        (dict(prompts=[[1, 72.7]]), r"prompt 0 holds 72.7 \(float\): expected integers"),
        (
            dict(prompts=[[1, np.float32(3)]]),
            r"prompt 0 holds np.float32\(3.0\) \(float32\): expected",
        ),
        (dict(prompts=[[1, "a"]]), r"prompt 0 holds 'a' \(str\): expected integers"),
        (dict(stop_tokens=[99999]), r"stop_tokens has token ids \[99999\] outside the vocab"),
        (dict(stop_tokens=[[2], [-3]], prompts=[[1], [2]]), r"stop_tokens row 1 has token ids"),
        (dict(stop_tokens=[2.0]), r"stop_tokens holds 2.0 \(float\)"),
        (dict(pad_id=320), r"pad_id has token ids \[320\] outside the vocabulary"),
    ]
    for kwargs, message in cases:
        args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
        rest = {k: v for k, v in args.items() if k in ("stop_tokens", "pad_id")}
        with pytest.raises(ValueError, match=message):
            generate(LLAMA, llama_params, args["prompts"], args["max_new_tokens"], **rest)
    # numpy integers are integers; a top-k beyond the vocabulary is refused, not clamped.
    assert len(generate(LLAMA, llama_params, [np.array([1, 2])], np.int64(1))[0]) == 1
    with pytest.raises(ValueError, match="top_k=321 is more than the model's 320 token ids"):
        generate(LLAMA, llama_params, [[1, 2]], 4, chain=sample.strategies(top_k=321))
    with pytest.raises(ValueError, match=r"temperature=-0.5 must be finite and >= 0"):
        sample.strategies(temperature=-0.5)
    with pytest.raises(ValueError, match=r"temperature=inf must be finite"):
        sample.strategies(temperature=float("inf"))
    # A [B, T] array of prompts works like lists; another model's parameters and a key that is
    # not one are refused by name.
    assert generate(LLAMA, llama_params, np.array([[1, 2]]), 2) == generate(
        LLAMA, llama_params, [[1, 2]], 2
    )
    with pytest.raises(
        ValueError,
        match=r"params do not match this ModelConfig: \['embed'\]\['embedding'\] is missing",
    ):
        generate(LLAMA, {"foo": llama_params}, [[1, 2]], 2)
    with pytest.raises(ValueError, match=r"key=None: expected an int seed or a jax\.random\.key"):
        generate(LLAMA, llama_params, [[1, 2]], 2, key=None)
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        sample.strategies(top_p=1.5)
    with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
        sample.strategies(top_p=0)
    with pytest.raises(ValueError, match="top_k=0 must be an integer >= 1"):
        sample.strategies(top_k=0)


def test_greedy_without_cache_is_the_argmax_loop(llama_params):
    prompt = [1, 40, 41, 42]
    got = sample.greedy_without_cache(LLAMA, llama_params, prompt, 6)
    assert got == prompt + _argmax_loop(LLAMA, llama_params, prompt, 6)


@pytest.mark.parametrize(
    "cfg",
    [LLAMA, GPT2, dataclasses.replace(LLAMA, prompt_tokens=3)],
    ids=["llama_unrolled", "gpt2_scanned", "llama_prompt_tuned"],
)
def test_a_prefix_lm_decodes_after_a_bidirectional_prompt_as_the_full_forward(cfg):
    """A prefix LM's prompt is its prefix: the cached loop (bidirectional prefill, then causal
    steps), on ragged prompts in one batch, equals greedy argmax over full forward passes that
    mark the prompt as the prefix; and reading the prompt causally would give other tokens."""
    cfg = dataclasses.replace(cfg, prefix_lm=True)
    params = random_params(cfg, seed=5)
    forward = jax.jit(
        lambda p, t, seg, pre: Transformer(cfg).apply(
            {"params": p}, t, segment_ids_BT=seg, prefix_BT=pre
        )[0]
    )

    def full_forward_loop(prompt, n):
        seq, length = list(prompt), cfg.max_seq_len - cfg.prompt_tokens
        prefix = (np.arange(length) < len(prompt))[None]
        for _ in range(n):
            tokens = np.zeros((1, length), np.int32)
            tokens[0, : len(seq)] = seq
            segments = (np.arange(length) < len(seq)).astype(np.int32)[None]
            logits = forward(params, tokens, segments, prefix)
            seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
        return seq[len(prompt) :]

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, n).tolist() for n in (7, 2, 12)]
    got = generate(cfg, params, prompts, 6)
    assert got == [full_forward_loop(p, 6) for p in prompts]
    assert got[0] == sample.greedy_without_cache(cfg, params, prompts[0], 6)[7:]
    # The prompt's last logits differ from reading it causally (tokens of a random model may not).
    batch = sample.prepare(cfg, prompts, 6)
    last = {}
    for c in (cfg, dataclasses.replace(cfg, prefix_lm=False)):
        cache = sample.init_cache(c, len(prompts), batch.cache_len)
        last[c.prefix_lm] = sample.prefill(c, params, batch.tokens, batch.lengths, cache)[0]
    assert np.abs(np.asarray(last[True]) - np.asarray(last[False])).max() > 1e-2


def test_a_sliding_window_model_generates_past_its_window_from_a_ring_buffer():
    """Mistral-style (window 8): `generate` keeps 8 cache slots per row (not prompt + new
    tokens) and gives the no-cache argmax loop's tokens far past the window."""
    cfg = dataclasses.replace(LLAMA, sliding_window=8)
    params = random_params(cfg, seed=7)
    prompts = [[1, 40, 41], [1, *range(50, 62)]]  # shorter and longer than the window
    batch = sample.prepare(cfg, prompts, 30)
    assert sample.uses_ring(cfg, batch.cache_len)
    _, cache = jax.jit(
        lambda p: sample.prefill_cache(cfg, p, batch.tokens, batch.lengths, batch.cache_len)
    )(params)
    assert cache.max_length == 8
    got = generate(cfg, params, prompts, 30)
    assert got == [_argmax_loop(cfg, params, p, 30) for p in prompts]
