"""Every supported family against Hugging Face transformers (CPU torch) as the reference.

Each tiny model is built by transformers from a config, filled with random weights (norm scales
and biases included) and saved with `save_pretrained`; jaxlm converts the directory and must give
the same logits and the same greedy continuation, and export it back to the same tensors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.interop import hf  # noqa: E402
from jaxlm.interop.safetensors_io import SafetensorsDir  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402
from jaxlm.sample import Greedy, generate  # noqa: E402
from tests.interop import hf_models  # noqa: E402

B, T, NEW = 2, 12, 16
# The scan layout each family is imported with (both layouts appear; MoE patterns decide some).
SCAN = {"gpt2": False, "llama_biases_tied": False, "qwen2": False}


@dataclasses.dataclass
class Converted:
    hf_dir: object
    model: object  # the transformers model
    config: object  # jaxlm ModelConfig
    params: object


@pytest.fixture(scope="module", params=list(hf_models.FAMILIES))
def converted(request, tmp_path_factory):
    family = request.param
    hf_dir = tmp_path_factory.mktemp(family)
    model = hf_models.build(family, hf_dir, seed=len(family))
    if family == "mistral":
        # The pre-5.x config.json form (top-level rope_theta) must read the same way.
        hf_models.legacy_rope_config(hf_dir, theta=20_000.0)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    config = hf.load_model_config(hf_dir, scan_layers=SCAN.get(family))
    return Converted(hf_dir, model, config, hf.params_from_hf(hf_dir, config))


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, hf_models.VOCAB, (B, T))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _jaxlm_logits(config, params, tokens):
    apply = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t)[0])
    return np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)))


def test_config_matches_the_family(converted):
    cfg, hf_cfg = converted.config, converted.model.config
    assert cfg.vocab_size == hf_cfg.vocab_size
    assert cfg.num_layers == hf_cfg.num_hidden_layers
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.param_dtype == "float32"
    if hf_cfg.model_type == "mistral":
        assert cfg.sliding_window == 6 and cfg.rope_theta == 20_000.0
    if hf_cfg.model_type == "qwen2":
        assert cfg.attn_bias and not cfg.use_attn_out_bias
    if hf_cfg.model_type == "qwen2_moe":
        assert (cfg.moe.first_dense, cfg.moe.num_shared_experts, cfg.moe.renormalize) == (
            1,
            2,
            False,
        )
    if hf_cfg.model_type == "qwen3_moe":
        assert (cfg.moe.every, cfg.moe.renormalize, cfg.scan_layers) == (2, True, True)


def test_logits_match_transformers(converted):
    tokens = _tokens()
    want = _hf_logits(converted.model, tokens)
    got = _jaxlm_logits(converted.config, converted.params, tokens)
    # float32 noise scales with the logits: torch's CPU forward itself varied by 1.9e-4 at a
    # logit scale of 21 (GPT-2 here) between two processes on the same machine, while jaxlm's
    # logits stay within about 1e-5 of it; a dropped bias or misplaced norm moves them by ~0.1.
    atol = max(1e-4, 2e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_greedy_generation_matches_transformers(converted):
    prompts = _tokens(seed=1)[:, :8]
    with torch.no_grad():
        out = converted.model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    want = out[:, prompts.shape[1] :].tolist()
    got = generate(converted.config, converted.params, prompts.tolist(), NEW, chain=(Greedy(),))
    assert got == want


def test_export_round_trips_every_tensor(converted, tmp_path):
    """HF -> jaxlm -> HF gives the same tensors, and transformers loads the result."""
    hf.save_hf(tmp_path, converted.config, converted.params)
    before, after = SafetensorsDir(converted.hf_dir), SafetensorsDir(tmp_path)
    assert after.names() == before.names()
    for name in before.names():
        np.testing.assert_array_equal(after.view(name), before.view(name), err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(converted.model)
    tokens = _tokens(seed=2)
    np.testing.assert_allclose(
        _hf_logits(reloaded, tokens), _hf_logits(converted.model, tokens), atol=1e-5, rtol=0
    )


def test_other_scan_layout_gives_the_same_logits(converted):
    """The unscanned and scanned parameter layouts hold the same model."""
    cfg = converted.config
    if not cfg.scan_layers and cfg.moe.enabled and cfg.moe.first_dense:
        # The one layout that does not exist: scanned layers must repeat one pattern.
        with pytest.raises(ValueError, match=r"scanned layers must repeat one pattern"):
            dataclasses.replace(cfg, scan_layers=True)
        return
    other = dataclasses.replace(cfg, scan_layers=not cfg.scan_layers)
    params = hf.params_from_hf(converted.hf_dir, other)
    tokens = _tokens(seed=3)
    np.testing.assert_allclose(
        _jaxlm_logits(other, params, tokens),
        _jaxlm_logits(cfg, converted.params, tokens),
        atol=1e-5,
        rtol=0,
    )
