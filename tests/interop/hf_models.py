"""Tiny random Hugging Face models of every supported family, saved with `save_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB = 320  # >= 259, so the byte tokenizer fits when a directory has no tokenizer files
_COMMON = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

# family name -> (transformers config class, config kwargs). Each one exercises something:
# GQA, explicit head_dim, llama3 / linear RoPE, tied and untied outputs, every bias pattern,
# QK-norm, a sliding window shorter than the test sequences, dense layers between MoE layers.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5),
    ),
    "llama3": (
        "LlamaConfig",
        _LLAMA_LIKE
        | dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "llama_biases_tied": (
        "LlamaConfig",
        _LLAMA_LIKE
        | dict(
            head_dim=24,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh",
            rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=2.0),
        ),
    ),
    "mistral": ("MistralConfig", _LLAMA_LIKE | dict(sliding_window=6)),
    "mixtral": ("MixtralConfig", _LLAMA_LIKE | dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE | dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", _LLAMA_LIKE | dict(head_dim=32)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        _LLAMA_LIKE
        | dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=3,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        _LLAMA_LIKE
        | dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            norm_topk_prob=True,
        ),
    ),
}


_ENCODER = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
    layer_norm_eps=1e-12,
)

# Masked-LM encoders (transformers class, config kwargs): BERT with two token types and an
# exact-GELU head, BERT with an untied output and ReLU, RoBERTa (positions offset by its padding
# id 1, one token type).
ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("BertConfig", _ENCODER | dict(vocab_size=VOCAB, type_vocab_size=2, pad_token_id=0)),
    "bert_untied_relu": (
        "BertConfig",
        _ENCODER
        | dict(vocab_size=VOCAB, tie_word_embeddings=False, hidden_act="relu", pad_token_id=0),
    ),
    "roberta": (
        "RobertaConfig",
        _ENCODER | dict(vocab_size=VOCAB, type_vocab_size=1, pad_token_id=1, bos_token_id=0),
    ),
}


def build_encoder(family: str, directory: Path, seed: int = 0, cls: str = "") -> Any:
    """Save a tiny random masked-LM encoder of `family` (a key of ENCODERS) to `directory`;
    `cls` overrides the model class (e.g. "BertForPreTraining")."""
    import torch
    import transformers

    config_cls, kwargs = ENCODERS[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    if cls:
        model = getattr(transformers, cls)(config)
    else:
        model = transformers.AutoModelForMaskedLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def randomize(model: Any, seed: int) -> None:
    """Fill every parameter with noise, so a dropped bias or a misplaced norm changes the logits:
    norm scales ~ 1 + 0.2 N, biases ~ 0.1 N, embeddings ~ 0.5 N, weights ~ N / sqrt(fan_in)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                is_norm = "norm" in name.lower() or "ln_" in name
                p.copy_(1.0 + 0.2 * noise if is_norm else 0.1 * noise)
            elif any(k in name for k in ("embed_tokens", "wte", "wpe", "embeddings")):
                p.copy_(0.5 * noise)
            else:
                # nn.Linear (and fused experts) store [..., out, in]; GPT-2's Conv1D [in, out].
                fan_in = p.shape[0] if ".c_" in name else p.shape[-1]
                p.copy_(noise * fan_in**-0.5)


def build(family: str, directory: Path, seed: int = 0) -> Any:
    """Save a tiny random model of `family` (a key of FAMILIES) to `directory`; return it."""
    import torch
    import transformers

    cls, kwargs = FAMILIES[family]
    config = getattr(transformers, cls)(**_COMMON, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def legacy_rope_config(directory: Path, theta: float) -> None:
    """Rewrite config.json in the pre-5.x form: a top-level rope_theta, no rope_parameters."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = theta
    config["rope_scaling"] = None
    path.write_text(json.dumps(config, indent=2))
