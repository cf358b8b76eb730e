"""ModelConfig validation and the presets."""

import dataclasses
import itertools
import math

import flax.linen as nn
import jax
import pytest

from jaxlm.configs import PRESETS, ModelConfig, get_preset
from jaxlm.configs.overrides import from_dict, to_dict
from jaxlm.metrics import param_count
from jaxlm.model.transformer import abstract_params


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_heads=8, num_kv_heads=3),
            r"num_heads=8 must be divisible by num_kv_heads=3; "
            r"valid num_kv_heads: \[1, 2, 4, 8\]",
        ),
        (dict(position="rope", head_dim=15), r"head_dim=15 must be even with position='rope'"),
        (dict(sliding_window=0), r"sliding_window=0 must be an integer >= 1"),
        (dict(scan_unroll=0), r"scan_unroll=0 must be an integer >= 1"),
        (
            dict(d_model=65, num_heads=4),
            r"d_model=65 is not divisible by num_heads=4; set head_dim",
        ),
        (dict(activation="swish"), r"activation='swish' is not valid; choose one of \['gelu', "),
        (dict(norm="batchnorm"), r"norm='batchnorm' is not valid; choose one of"),
        (dict(position="alibi"), r"position='alibi' is not valid"),
        (dict(remat="some"), r"remat='some' is not valid; choose one of \['none', 'full', "),
        (dict(vocab_size=0), r"vocab_size=0 must be an integer >= 1"),
        (dict(num_layers=2.5), r"num_layers=2.5 must be an integer >= 1"),
        (dict(norm_eps=0.0), r"norm_eps=0.0 must be > 0"),
        (dict(attn_logit_softcap=-1.0), r"attn_logit_softcap=-1.0 must be > 0 or None"),
        (dict(dtype="float8"), r"dtype='float8' is not valid"),
        (
            dict(position="sinusoidal", d_model=63, num_heads=3, head_dim=8),
            r"d_model=63 must be even",
        ),
        (
            dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
            r"rope_high_freq_factor must be > rope_low_freq_factor",
        ),
    ],
)
def test_bad_model_configs_name_the_field_and_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_derived_sizes():
    cfg = ModelConfig(d_model=96, num_heads=6)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (6, 16, 384)
    assert ModelConfig(norm="rmsnorm").norm_bias is False  # RMSNorm has no bias


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_hashable_and_round_trips(name):
    cfg = get_preset(name)
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_equals_the_initialised_tree(name):
    """Counted from the config alone, equal to the leaves of an abstract init (8b included)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(get_preset(name))))
    assert param_count(get_preset(name)).total == sum(math.prod(x.shape) for x in leaves)


@pytest.mark.parametrize(
    ("name", "lora", "prompt"),
    [
        ("tiny-llama", "query,key,value,out,gate,up,down", 3),
        ("tiny", "value,up", 0),
        ("tiny-moe", "query,out", 2),
    ],
)
def test_param_count_with_adapters_equals_the_initialised_tree(name, lora, prompt):
    from jaxlm.configs import LoRAConfig

    cfg = dataclasses.replace(
        get_preset(name), lora=LoRAConfig(rank=2, targets=lora), prompt_tokens=prompt
    )
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
    assert param_count(cfg).total == sum(math.prod(x.shape) for x in leaves)
    assert (
        param_count(cfg).adapters
        == param_count(cfg).total
        - param_count(dataclasses.replace(cfg, lora=LoRAConfig(), prompt_tokens=0)).total
    )


def test_param_count_with_qkv_bias_but_no_output_bias():
    """Qwen2-style attention (bias on q/k/v only) counted like the initialised tree."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), attn_bias=True, attn_out_bias=False)
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(cfg)))
    assert param_count(cfg).total == sum(math.prod(x.shape) for x in leaves)


@pytest.mark.parametrize(
    "name, published",
    [
        ("gpt2-124m", 124_439_808),  # Radford et al. 2019 / Hugging Face "gpt2"
        ("gpt2-350m", 354_823_168),  # "gpt2-medium"
        ("llama3.2-1b", 1_235_814_400),  # Llama 3.2 1B (tied embeddings)
        ("llama3-8b", 8_030_261_248),  # Llama 3 8B
        ("bert-base", 109_514_298),  # transformers' BertForMaskedLM of bert-base-uncased
    ],
)
def test_published_architectures_have_their_published_size(name, published):
    assert param_count(get_preset(name)).total == published


def test_gpt2_preset_is_exactly_gpt2():
    cfg = get_preset("gpt2-124m")
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.num_layers, cfg.d_model) == (50257, 1024, 12, 768)
    assert cfg.tie_embeddings and cfg.attn_bias and cfg.mlp_bias and cfg.position == "learned"


def test_scaling_ladder_roughly_doubles():
    sizes = [param_count(get_preset(f"ladder-{i}")).non_embedding for i in range(8)]
    ratios = [b / a for a, b in itertools.pairwise(sizes)]
    assert all(1.7 < r < 2.4 for r in ratios), ratios


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(
        ValueError, match=r"unknown model preset 'gpt2-124'. Did you mean 'gpt2-124m'"
    ):
        get_preset("gpt2-124")
