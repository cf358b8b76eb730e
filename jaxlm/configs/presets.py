"""Named model shapes: tiny ones for tests, published architectures, a scaling ladder."""

from __future__ import annotations

import difflib

from jaxlm.configs.model import ModelConfig, MoEConfig
from jaxlm.configs.run import RunConfig, TrainConfig

_GPT2 = dict(
    vocab_size=50257,
    max_seq_len=1024,
    activation="gelu_tanh",
    norm="layernorm",
    norm_eps=1e-5,
    position="learned",
    tie_embeddings=True,
    attn_bias=True,
    mlp_bias=True,
)

_LLAMA = dict(
    activation="swiglu",
    norm="rmsnorm",
    norm_eps=1e-5,
    position="rope",
    attn_bias=False,
    mlp_bias=False,
)

_BERT = dict(
    activation="gelu",
    norm="layernorm",
    norm_eps=1e-12,
    position="learned",
    tie_embeddings=True,
    attn_bias=True,
    mlp_bias=True,
    causal=False,
    norm_position="post",
    embed_norm=True,
    type_vocab_size=2,
    head="mlm",
    depth_scaled_init=False,
)

_LLAMA3 = dict(_LLAMA, vocab_size=128256, rope_theta=500_000.0)


def _ladder(num_layers: int, d_model: int, mlp_dim: int) -> ModelConfig:
    # Llama-style blocks with 64-dim heads; mlp_dim is ~8/3 d_model rounded up to 128.
    return ModelConfig(
        **_LLAMA,
        vocab_size=32768,
        max_seq_len=2048,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=d_model // 64,
        mlp_dim=mlp_dim,
        tie_embeddings=False,
    )


PRESETS: dict[str, ModelConfig] = {
    # GPT-2-style block at toy size: tests and quick CPU runs. Vocabulary 320 holds the byte
    # tokenizer's 259 ids (256 bytes + pad/bos/eos) and splits evenly over up to 64 devices.
    "tiny": ModelConfig(
        **{**_GPT2, "vocab_size": 320, "max_seq_len": 128},
        d_model=64,
        num_layers=2,
        num_heads=4,
        mlp_dim=256,
    ),
    # Llama-style block at toy size: GQA (4 query heads, 2 kv heads), RoPE, SwiGLU, RMSNorm.
    "tiny-llama": ModelConfig(
        **_LLAMA,
        vocab_size=320,
        max_seq_len=128,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=192,
        tie_embeddings=False,
    ),
    # The default `jaxlm train` model: Llama-style, byte vocabulary, trains on a 2-core CPU.
    # Mixture-of-Experts: a toy for tests, a Mixtral-style model (8 experts, top-2, renormalised,
    # every layer) and a DeepSeek/Qwen-MoE-style fine-grained one (16 small experts, top-4 not
    # renormalised, plus 2 shared experts behind a sigmoid gate).
    "tiny-moe": ModelConfig(
        **_LLAMA,
        vocab_size=320,
        max_seq_len=128,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=128,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2),
    ),
    "mixtral-small": ModelConfig(
        **_LLAMA,
        vocab_size=32000,
        max_seq_len=4096,
        d_model=1024,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        mlp_dim=3584,
        tie_embeddings=False,
        rope_theta=1e6,
        moe=MoEConfig(num_experts=8, top_k=2),
    ),
    "fine-grained-moe": ModelConfig(
        **_LLAMA,
        vocab_size=32000,
        max_seq_len=4096,
        d_model=1024,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        mlp_dim=2816,
        tie_embeddings=False,
        moe=MoEConfig(
            num_experts=16,
            top_k=4,
            expert_mlp_dim=704,
            num_shared_experts=2,
            shared_expert_gate=True,
            renormalize=False,
        ),
    ),
    "small": ModelConfig(
        **_LLAMA,
        vocab_size=320,
        max_seq_len=256,
        d_model=128,
        num_layers=4,
        num_heads=4,
        mlp_dim=384,
        tie_embeddings=True,
    ),
    # Published architectures (parameter counts equal the published ones).
    "gpt2-124m": ModelConfig(**_GPT2, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "gpt2-350m": ModelConfig(**_GPT2, d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "llama3.2-1b": ModelConfig(
        **_LLAMA3,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        max_seq_len=131072,
        tie_embeddings=True,
        rope_scaling="llama3",
        rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
    ),
    # BERT: bidirectional post-LN blocks, embedding norm, two token types, the masked-LM head
    # (train with task.kind=mlm). The toy has the byte vocabulary (its mask token is id 259).
    "tiny-bert": ModelConfig(
        **_BERT, vocab_size=320, max_seq_len=128, d_model=64, num_layers=2, num_heads=4, mlp_dim=256
    ),
    "bert-base": ModelConfig(
        **_BERT,
        vocab_size=30522,
        max_seq_len=512,
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
    ),
    "llama3-8b": ModelConfig(
        **_LLAMA3,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        max_seq_len=8192,
        tie_embeddings=False,
    ),
    # Scaling ladder: non-embedding parameters ~3.4M, 6.8M, 14M, 26M, 51M, 99M, 206M, 397M.
    "ladder-0": _ladder(4, 256, 768),
    "ladder-1": _ladder(8, 256, 768),
    "ladder-2": _ladder(8, 384, 1024),
    "ladder-3": _ladder(8, 512, 1408),
    "ladder-4": _ladder(10, 640, 1792),
    "ladder-5": _ladder(14, 768, 2048),
    "ladder-6": _ladder(16, 1024, 2816),
    "ladder-7": _ladder(20, 1280, 3456),
}


def get_preset(name: str) -> ModelConfig:
    """The `ModelConfig` called `name`; the error lists the presets and the closest names."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}.{hint} Presets: {sorted(PRESETS)}")
    return PRESETS[name]


def default_job() -> RunConfig:
    """The default `jaxlm train` job: the "small" model on this Python's standard-library
    sources, 1500 steps (about 3 minutes on 2 CPU cores)."""
    return RunConfig(model=get_preset("small"), train=TrainConfig(steps=1500))
