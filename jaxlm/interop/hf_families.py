"""The Hugging Face model families jaxlm converts: their defaults, names and requirements.

One `Family` row per transformers `model_type` says how that family spells the shared decoder
architecture (which biases, QK-norm, which MoE and sliding-window fields); `mismatches` says
what keeps a `ModelConfig` from being exactly one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxlm.configs.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers model family spells and varies the shared decoder architecture."""

    model_type: str
    architecture: str
    # transformers' defaults for keys a config.json may leave out
    defaults: Mapping[str, Any]
    # q/k/v/o biases: "attention_bias" (one key for all four), "qkv" (q/k/v always, o never),
    # "qkv_bias" (q/k/v per that key, o never), "none", "all" (GPT-2: every projection)
    bias: str = "attention_bias"
    qk_norm: bool = False
    # "mixtral" (experts only), "qwen" (experts + dense layers), "qwen_shared" (+ gated shared)
    moe: str | None = None
    # which layers slide: "none", "all" (sliding_window alone), "all_if_used" (needs
    # use_sliding_window), "from_max" (layers >= max_window_layers), "even_below_max" (Qwen2-MoE)
    window: str = "none"
    # An encoder (BERT, RoBERTa): bidirectional post-LN blocks with a masked-LM head.
    encoder: bool = False


_LLAMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
_QWEN_WINDOW = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
_QWEN_MOE = {
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
}

_ENCODER_DEFAULTS = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "type_vocab_size": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "position_embedding_type": "absolute",
}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "gpt2",
            "GPT2LMHeadModel",
            {
                "n_inner": None,
                "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5,
                "tie_word_embeddings": True,
                "n_positions": 1024,
                "initializer_range": 0.02,
            },
            bias="all",
        ),
        Family(
            "llama",
            "LlamaForCausalLM",
            {**_LLAMA_DEFAULTS, "max_position_embeddings": 2048, "rope_theta": 10_000.0},
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            {**_LLAMA_DEFAULTS, "max_position_embeddings": 131072, "rope_theta": 10_000.0}
            | {"sliding_window": 4096},
            bias="none",
            window="all",
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
            | {"rope_theta": 1e6, "sliding_window": None, "num_local_experts": 8}
            | {"num_experts_per_tok": 2, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0},
            bias="none",
            moe="mixtral",
            window="all",
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            {**_LLAMA_DEFAULTS, **_QWEN_WINDOW, "max_position_embeddings": 32768}
            | {"rope_theta": 10_000.0, "num_key_value_heads": 32},
            bias="qkv",
            window="from_max",
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            {**_LLAMA_DEFAULTS, **_QWEN_WINDOW, "max_position_embeddings": 32768}
            | {"rope_theta": 10_000.0, "num_key_value_heads": 32, "head_dim": 128},
            qk_norm=True,
            window="from_max",
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            {**_LLAMA_DEFAULTS, **_QWEN_WINDOW, **_QWEN_MOE, "max_position_embeddings": 32768}
            | {"rope_theta": 10_000.0, "num_key_value_heads": 16, "qkv_bias": True}
            | {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408}
            | {"shared_expert_intermediate_size": 5632},
            bias="qkv_bias",
            moe="qwen_shared",
            window="even_below_max",
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            {**_LLAMA_DEFAULTS, **_QWEN_WINDOW, **_QWEN_MOE, "max_position_embeddings": 32768}
            | {"rope_theta": 10_000.0, "num_key_value_heads": 4, "num_local_experts": 128}
            | {"num_experts_per_tok": 8, "moe_intermediate_size": 768},
            qk_norm=True,
            moe="qwen",
            window="all_if_used",
        ),
        Family(
            "bert",
            "BertForMaskedLM",
            {**_ENCODER_DEFAULTS, "pad_token_id": 0},
            bias="all",
            encoder=True,
        ),
        # RoBERTa's positions start after its padding id: position p is row pad_token_id + 1 + p.
        Family(
            "roberta",
            "RobertaForMaskedLM",
            {**_ENCODER_DEFAULTS, "pad_token_id": 1},
            bias="all",
            encoder=True,
        ),
    )
}


def position_offset(family: Family, pad_token_id: int | None) -> int:
    """Rows of the family's position table before position 0 (RoBERTa: pad_token_id + 1)."""
    if family.model_type != "roberta":
        return 0
    pad = family.defaults["pad_token_id"] if pad_token_id is None else pad_token_id
    return int(pad) + 1


# HF activation name -> jaxlm activation, for plain (GPT-2) and gated (Llama-style) MLPs.
PLAIN_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
PLAIN_ACTS |= {"relu": "relu"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}
GATED_ACTS |= {"gelu_new": "geglu"}
# ...and back (the first HF name for each).
PLAIN_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
GATED_NAMES = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


def score_architecture(family: Family) -> str:
    """The family's sequence-classification class (a reward model: one label)."""
    if family.model_type == "gpt2":
        return "GPT2ForSequenceClassification"
    return family.architecture.replace("ForCausalLM", "ForSequenceClassification")


def head_of(hf: Mapping[str, Any], family: Family) -> str:
    """ "score" for a one-label *ForSequenceClassification config.json, else "lm" ("mlm" for
    an encoder, whose masked-LM head every BERT/RoBERTa pre-training checkpoint holds)."""
    architectures = hf.get("architectures") or [family.architecture]
    if family.encoder:
        heads = ("ForMaskedLM", "ForPreTraining")
        if not any(a.endswith(heads) for a in architectures):
            raise ValueError(
                f"config.json describes a {architectures[0]}; jaxlm imports {family.model_type} "
                f"masked-LM checkpoints ({family.architecture}, or *ForPreTraining, whose "
                "next-sentence head is left out)"
            )
        return "mlm"
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return "lm"
    labels = hf.get("num_labels", len(hf.get("id2label") or {"0": ""}))
    if labels != 1:
        raise ValueError(
            f"config.json describes a {labels}-label classifier ({architectures[0]}); jaxlm "
            "imports one-label sequence classifiers (reward models) only"
        )
    return "score"


def family_of(hf: Mapping[str, Any]) -> Family:
    """The `Family` of a config.json dict, or a ValueError listing the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json has model_type={model_type!r}, which jaxlm cannot convert; "
            f"supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


class _AtLeast:
    """An "allowed values" entry for integers >= n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and value >= self.n

    def __repr__(self) -> str:
        return f">= {self.n}"


def _requirements(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """{ModelConfig field (dotted): allowed values} for `cfg` to be exactly `family`."""
    if family.encoder:
        return _gpt2_like(cfg) | {
            "causal": (False,),
            "head": ("mlm",),
            "norm_position": ("post",),
            "embed_norm": (True,),
            "type_vocab_size": _AtLeast(1),
        }
    decoder = {
        "prefix_lm": (False,),
        "head": ("lm", "score"),
        "norm_position": ("pre",),
        "embed_norm": (False,),
        "type_vocab_size": (0,),
    }
    return decoder | _decoder_requirements(cfg, family)


def _gpt2_like(cfg: ModelConfig) -> dict[str, Any]:
    """GPT-2's and BERT's shared block: learned positions, LayerNorm and biases everywhere,
    plain multi-head attention and MLP."""
    return {
        "position": ("learned",),
        "norm": ("layernorm",),
        "norm_bias": (True,),
        "activation": tuple(PLAIN_NAMES),
        "attn_bias": (True,),
        "use_attn_out_bias": (True,),
        "mlp_bias": (True,),
        "num_kv_heads": (cfg.num_heads,),
        "head_dim": (cfg.d_model // cfg.num_heads,),
        "qk_norm": (False,),
        "sliding_window": (None,),
        "moe.enabled": (False,),
        "attn_logit_softcap": (None,),
        "final_logit_softcap": (None,),
    }


def _decoder_requirements(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    if family.model_type == "gpt2":
        return _gpt2_like(cfg) | {"causal": (True,)}
    need: dict[str, Any] = {
        "position": ("rope",),
        "norm": ("rmsnorm",),
        "activation": tuple(GATED_NAMES),
        "attn_logit_softcap": (None,),
        "final_logit_softcap": (None,),
        "qk_norm": (family.qk_norm,),
        "moe.enabled": (family.moe is not None,),
        "mlp_bias": (False,),
        "causal": (True,),
    }
    if family.bias == "attention_bias":
        need["use_attn_out_bias"] = (cfg.attn_bias,)
    else:
        need["use_attn_out_bias"] = (False,)
        need["attn_bias"] = {"qkv": (True,), "qkv_bias": (True, False), "none": (False,)}[
            family.bias
        ]
    if family.model_type == "llama":
        need.update({"mlp_bias": (True, False), "sliding_window": (None,)})
    if family.window in ("none", "even_below_max"):
        need["sliding_window"] = (None,)
    if family.moe:
        need.update({"moe.score": ("softmax",), "moe.num_shared_experts": (0,)})
    if family.moe == "mixtral":
        need.update({"moe.every": (1,), "moe.first_dense": (0,), "moe.renormalize": (True,)})
    if family.moe == "qwen_shared":
        need.update({"moe.num_shared_experts": _AtLeast(1), "moe.shared_expert_gate": (True,)})
    return need


def _field(cfg: ModelConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def mismatches(cfg: ModelConfig, family: Family) -> list[str]:
    """What keeps `cfg` from being exactly `family` ("field=value (needs ...)"), or []."""
    return [
        f"{name}={_field(cfg, name)!r} (needs {allowed!r})"
        for name, allowed in _requirements(cfg, family).items()
        if _field(cfg, name) not in allowed
    ]


def export_family(cfg: ModelConfig, model_type: str | None = None) -> Family:
    """The family `cfg` is exported as: `model_type`, or the first one that matches exactly."""
    if model_type is not None:
        if model_type not in FAMILIES:
            raise ValueError(f"unknown model_type {model_type!r}; supported: {sorted(FAMILIES)}")
        problems = mismatches(cfg, FAMILIES[model_type])
        if problems:
            raise ValueError(
                f"this jaxlm model is not a Hugging Face {model_type!r} model: "
                + "; ".join(problems)
            )
        return FAMILIES[model_type]
    reasons = {}
    for family in FAMILIES.values():
        problems = mismatches(cfg, family)
        if not problems:
            return family
        reasons[family.model_type] = problems
    detail = "; ".join(f"{t}: {', '.join(p[:3])}" for t, p in reasons.items())
    raise ValueError(f"this jaxlm model has no Hugging Face equivalent ({detail})")
