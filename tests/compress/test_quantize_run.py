"""`jaxlm quantize` on a trained run: a new run of int8 / int4 weights, stored and restored
quantized and sharded, whose logits and held-out loss stay close to the float run's; it samples
through the usual command; what cannot be done is refused before anything is written."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint, loop
from jaxlm.compress.quantize import quantize_workdir, stored_bytes
from jaxlm.configs.quant import QuantConfig
from jaxlm.model.transformer import Transformer
from jaxlm.run import load_for_eval


@pytest.fixture(scope="module")
def quantized(trained, _session_cache):
    """The trained run as int8 per channel and as int4 (groups of 32, embedding too)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        for name, fmt in [
            ("int8", QuantConfig(bits=8)),
            ("int4", QuantConfig(bits=4, group=32, embed=True)),
        ]:
            out[name] = quantize_workdir(trained, trained.parent / name, fmt)
    return out


def _logits(workdir, tokens):
    config, _, params, _ = load_for_eval(workdir)
    apply = jax.jit(lambda p, t: Transformer(config.model).apply({"params": p}, t)[0])
    return config, params, np.asarray(apply(params, tokens))


def _tokens():
    text = b"def main(argv):\n    for name in sorted(argv):\n        print(name, len(name))\n"
    return jnp.asarray(np.frombuffer(text, np.uint8)[None, :64].astype(np.int32))


def test_quantized_runs_restore_as_integers_sharded_like_the_float_weights(trained, quantized):
    _, float_params, _ = _logits(trained, _tokens())
    for name, bits in (("int8", 8), ("int4", 4)):
        config, params, _ = _logits(quantized[name], _tokens())
        assert config.model.quant.bits == bits
        up = params["layers"]["mlp"]["up"]
        assert up["w_q"].dtype == (jnp.int8 if bits == 8 else jnp.uint8)
        assert "w" not in up
        # [layers, embed, mlp] over 8 devices: the embed dim is split (fsdp), as the float one
        spec = up["w_q"].sharding.spec
        assert spec == float_params["layers"]["mlp"]["up"]["w"].sharding.spec
        assert len(up["w_q"].addressable_shards) == 8 and spec[1] is not None
        # Scales are split where they keep a dim: per-channel int8 over the mlp outputs only.
        assert up["w_scale"].shape == (*up["w_q"].shape[:1], 1 if bits == 8 else 2, 256)
    # Bytes: int8 about a quarter of float32 (the float embedding and head aside); int4 with
    # those packed too, under 1/6 (scales of 32 inputs cost 1 bit per weight).
    float_bytes = stored_bytes(float_params)
    int8_bytes = stored_bytes(_logits(quantized["int8"], _tokens())[1])
    int4_bytes = stored_bytes(_logits(quantized["int4"], _tokens())[1])
    embed = stored_bytes(float_params["embed"]) + stored_bytes(float_params["unembed"])
    assert int8_bytes - embed < 0.27 * (float_bytes - embed)
    assert int4_bytes < float_bytes / 6


def test_quantized_logits_and_held_out_loss_stay_close_to_the_float_run(trained, quantized):
    _, _, ref = _logits(trained, _tokens())
    spread = ref.std()
    # Root-mean-square error of the logits over their spread (measured: 0.003 and 0.056).
    for name, bound in (("int8", 0.01), ("int4", 0.1)):
        _, _, got = _logits(quantized[name], _tokens())
        err = np.sqrt(np.mean(np.square(got - ref))) / spread
        assert 0 < err < bound, (name, err)
    base = loop.eval_workdir(trained, max_batches=4)["eval_loss"]
    assert base < 2.9  # it learned something (bytes: ln 256 = 5.5 at random)
    int8 = loop.eval_workdir(quantized["int8"], max_batches=4)["eval_loss"]
    int4 = loop.eval_workdir(quantized["int4"], max_batches=4)["eval_loss"]
    assert abs(np.exp(int8 - base) - 1) < 0.01  # perplexity within 1%
    assert np.exp(int4 - base) - 1 < 0.05


def test_quantize_and_sample_from_the_command_line(trained, tmp_path, _session_cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXLM_CACHE": str(_session_cache)}

    def run(*args):
        cmd = [sys.executable, "-m", "jaxlm", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)

    out = tmp_path / "q4"
    done = run("quantize", "--workdir", str(trained), "--out", str(out), "--bits", "4",
               "--group", "32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "int4 g32" in done.stderr
    cfg = checkpoint.load_run_config(out)
    assert cfg.model.quant == QuantConfig(bits=4, group=32)
    sample = run("sample", "--workdir", str(out), "--prompt", "def ", "--max-new-tokens", "8",
                 "--temperature", "0")  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def ")
    again = run("quantize", "--workdir", str(out), "--out", str(tmp_path / "q8"), "--bits", "8")
    assert again.returncode != 0
    assert "already quantized (model.quant: int4 g32)" in again.stderr
    assert not (tmp_path / "q8").exists()
    bad = run("quantize", "--workdir", str(trained), "--out", str(tmp_path / "x"), "--bits", "2")
    assert "--bits 2 is not valid; choose 8 (int8) or 4" in bad.stderr
    # int4's default groups of 128 do not divide this model's 64-wide inputs
    bad = run("quantize", "--workdir", str(trained), "--out", str(tmp_path / "x"), "--bits", "4")
    assert "group=128 does not divide" in bad.stderr and not (tmp_path / "x").exists()


def test_training_a_quantized_run_is_refused(quantized, _session_cache, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(_session_cache))
    config = checkpoint.load_run_config(quantized["int8"])
    refusal = r"stored quantized \(model.quant: int8 per channel\) and cannot train; fine-tune"
    with pytest.raises(ValueError, match=refusal):
        loop.train(config, quantized["int8"])
    steps = checkpoint.complete_steps(quantized["int8"])
    assert steps == [0]


def test_convert_from_hf_quantizes_at_import(tmp_path, _session_cache, monkeypatch):
    """An HF Llama imported with quant: the same model as the float import, weights int8."""
    pytest.importorskip("transformers")
    from jaxlm.interop import hf
    from tests.interop import hf_models

    monkeypatch.setenv("JAXLM_CACHE", str(_session_cache))
    hf_models.build("llama3", tmp_path / "hf")
    plain = hf.import_checkpoint(tmp_path / "hf", tmp_path / "float")
    int8 = hf.import_checkpoint(tmp_path / "hf", tmp_path / "int8", quant=QuantConfig(bits=8))
    tokens = _tokens() % hf_models.VOCAB
    _, _, ref = _logits(plain, tokens)
    config, params, got = _logits(int8, tokens)
    assert config.model.quant == QuantConfig(bits=8)
    assert params["layers"]["attn"]["query"]["w_q"].dtype == jnp.int8
    err = np.sqrt(np.mean(np.square(got - ref))) / ref.std()
    assert 0 < err < 0.03, err  # measured 0.015 (random weights: wider than a trained model's)


def _np_quantize_heads(x):
    """Each [..., H] vector on its own: scale max|x| * float32(1 / 127), values rounded."""
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(-1) * np.float32(1 / 127)
    safe = np.where(scale > 0, scale, np.float32(1))
    return np.clip(np.round(x / safe[..., None]), -127, 127).astype(np.int8), scale


def test_int8_kv_cache_holds_numpy_quantized_keys_and_decodes_like_the_float_cache(trained):
    import dataclasses

    from jaxlm import sample
    from jaxlm.model.kv_cache import init_cache

    config, _, params, _ = load_for_eval(trained)
    model = config.model
    int8 = dataclasses.replace(model, kv_cache_dtype="int8")
    prompt = _tokens()[:, :40]
    prompt = jnp.concatenate([prompt, jnp.roll(prompt, 7, axis=1)])
    lengths = jnp.asarray([40, 29], jnp.int32)  # ragged: row 1 right-padded
    run = jax.jit(sample.prefill, static_argnums=0)
    logits_f, cache_f = run(model, params, prompt, lengths, init_cache(model, 2, 64))
    logits_8, cache_8 = run(int8, params, prompt, lengths, init_cache(int8, 2, 64))
    assert cache_8.k.dtype == jnp.int8 and cache_8.k_scale.shape == cache_8.k.shape[:-1]
    # What the prefill wrote into layer 0 (whose inputs do not depend on the cache): NumPy's
    # quantization of the float cache's keys and values. Later layers read the int8 cache
    # back, so their keys move a little: within 2% of the largest.
    for got, scale, ref in ((cache_8.k, cache_8.k_scale, cache_f.k),
                            (cache_8.v, cache_8.v_scale, cache_f.v)):  # fmt: skip
        got, scale, ref = np.asarray(got), np.asarray(scale), np.asarray(ref)
        for row, n in enumerate([40, 29]):
            want_q, want_s = _np_quantize_heads(ref[0, row, :n])
            np.testing.assert_allclose(scale[0, row, :n], want_s, rtol=1e-6)
            diff = np.abs(got[0, row, :n].astype(int) - want_q)
            assert diff.max() <= 1 and np.mean(diff) < 1e-3  # a rounding tie at most
            back = got[:, row, :n] * scale[:, row, :n, :, None]
            assert np.abs(back - ref[:, row, :n]).max() < 0.02 * np.abs(ref).max()
    scale = np.abs(np.asarray(logits_f)).std()
    assert np.abs(np.asarray(logits_8) - np.asarray(logits_f)).max() < 0.05 * scale
    # Greedy decoding over 48 tokens, the float cache's choice fed to both caches at every step
    # (so one early near-tie does not make the rest of the text differ): the int8 cache picks
    # the same next token at (nearly) every step, and where it does not, the float logits'
    # top two were a near-tie.
    step = jax.jit(sample.decode_step, static_argnums=0)
    lf, cf = run(model, params, prompt, lengths, init_cache(model, 2, 96))
    l8, c8 = run(int8, params, prompt, lengths, init_cache(int8, 2, 96))
    agree, ties = [], []
    for _ in range(48):
        a, b = np.asarray(lf), np.asarray(l8)
        assert np.abs(a - b).max() < 0.05 * scale
        same = a.argmax(-1) == b.argmax(-1)
        agree += list(same)
        top2 = np.sort(a, -1)[:, -2:]
        ties += list((top2[:, 1] - top2[:, 0])[~same] / scale)
        feed = jnp.asarray(a.argmax(-1), jnp.int32)
        lf, cf = step(model, params, feed, cf)
        l8, c8 = step(int8, params, feed, c8)
    assert np.mean(agree) >= 0.95, np.mean(agree)  # measured: 95 of 96 (a tie of 0.0006)
    assert all(t < 0.05 for t in ties), ties
    # Bytes: a llama3-8b cache is about half of bfloat16's (scales add 4 bytes per 128 values).
    from jaxlm.configs import get_preset

    big = dataclasses.replace(get_preset("llama3-8b"), dtype="bfloat16")
    big8 = dataclasses.replace(big, kv_cache_dtype="int8")
    bf16, i8 = (jax.eval_shape(lambda m=m: init_cache(m, 8, 4096)) for m in (big, big8))
    ratio = i8.nbytes / bf16.nbytes
    assert 0.5 < ratio < 0.52, ratio
