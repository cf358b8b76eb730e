"""Hugging Face `config.json` ⇄ `ModelConfig`.

Import reads the JSON itself (no transformers needed), fills omitted keys with the defaults of
transformers' own config classes (`hf_families.FAMILIES`), and refuses, naming the field,
anything jaxlm cannot represent exactly. Export writes the fields the matching family's
transformers config class reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlm.configs.model import ModelConfig, MoEConfig
from jaxlm.interop.hf_families import (
    GATED_ACTS,
    GATED_NAMES,
    PLAIN_ACTS,
    PLAIN_NAMES,
    Family,
    export_family,
    family_of,
    head_of,
    position_offset,
    score_architecture,
)


class _Reader:
    """Looks keys up in a config.json dict, then in the family's defaults; names what it refuses."""

    def __init__(self, hf: Mapping[str, Any], family: Family) -> None:
        self.hf, self.family = hf, family

    def __call__(self, key: str, *aliases: str) -> Any:
        for k in (key, *aliases):
            if k in self.hf:
                return self.hf[k]
        if key in self.family.defaults:
            return self.family.defaults[key]
        raise ValueError(f"config.json of a {self.family.model_type} model lacks {key!r}")

    def optional(self, key: str) -> Any:
        """The value of `key` (or its default), None when neither is there or it is null."""
        return self.hf.get(key, self.family.defaults.get(key)) or None

    def refuse(self, key: str, why: str) -> ValueError:
        value = self.hf.get(key, self.family.defaults.get(key))
        return ValueError(
            f"config.json: {key}={value!r} cannot be represented in jaxlm ({why}); "
            f"model_type={self.family.model_type!r}"
        )


def _rope(get: _Reader, max_len: int) -> dict[str, Any]:
    params = get.hf.get("rope_parameters") or get.hf.get("rope_scaling") or {}
    key = "rope_parameters" if get.hf.get("rope_parameters") else "rope_scaling"
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (e.g. {"full_attention": {...}}): fine when all agree.
        if len({repr(sorted(v.items())) for v in params.values()}) != 1:
            raise get.refuse(key, "different RoPE per layer type")
        params = next(iter(params.values()))
    theta = params.get("rope_theta", get.hf.get("rope_theta", get.family.defaults["rope_theta"]))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = params.get("partial_rotary_factor", get.hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise get.refuse("partial_rotary_factor", "RoPE on every head feature only")
    out: dict[str, Any] = {"position": "rope", "rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return out | {
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params.get("original_max_position_embeddings", max_len)),
        }
    raise get.refuse(key, f"rope_type {kind!r}; supported: 'default', 'linear', 'llama3'")


def _window(get: _Reader, num_layers: int) -> int | None:
    """The sliding window if every layer uses it, None if none does; refuses a mix."""
    kind = get.family.window
    if kind == "none":
        return None
    window = get("sliding_window")
    if kind != "all" and not get("use_sliding_window"):
        window = None
    if not window:  # None, or Qwen2-MoE's 0 for "off"
        return None
    if "layer_types" in get.hf and get.hf["layer_types"] is not None:
        sliding = [t == "sliding_attention" for t in get.hf["layer_types"]]
        key = "layer_types"
    elif kind == "from_max":
        sliding = [i >= get("max_window_layers") for i in range(num_layers)]
        key = "max_window_layers"
    elif kind == "even_below_max":
        sliding = [i % 2 == 0 and i < get("max_window_layers") for i in range(num_layers)]
        key = "max_window_layers"
    else:
        return int(window)
    if all(sliding):
        return int(window)
    if not any(sliding):
        return None
    raise get.refuse(key, "jaxlm slides the window in every layer or in none")


def _moe(get: _Reader, num_layers: int, mlp_dim: int) -> tuple[MoEConfig, bool]:
    """(MoEConfig, scan_layers possible) from the family's expert fields."""
    kind = get.family.moe
    if kind == "qwen_shared":
        experts = get("num_experts", "num_local_experts")
    else:
        experts = get("num_local_experts", "num_experts")
    if kind == "mixtral":
        moe_layers = list(range(num_layers))
        expert_dim, renormalize = None, True
    else:
        skip = set(get("mlp_only_layers") or [])
        step = get("decoder_sparse_step")
        moe_layers = [i for i in range(num_layers) if i not in skip and (i + 1) % step == 0]
        expert_dim, renormalize = get("moe_intermediate_size"), bool(get("norm_topk_prob"))
    if not experts or not moe_layers:
        return MoEConfig(), True
    # jaxlm's pattern: layer i is MoE iff i >= first_dense and (i - first_dense + 1) % every == 0.
    pattern = next(
        (
            (every, first)  # the scannable patterns (no dense prefix) first
            for first in range(num_layers)
            for every in range(1, num_layers + 1)
            if moe_layers
            == [i for i in range(num_layers) if i >= first and (i - first + 1) % every == 0]
        ),
        None,
    )
    if pattern is None:
        raise get.refuse(
            "mlp_only_layers",
            f"MoE layers {moe_layers} (with decoder_sparse_step={get('decoder_sparse_step')}) "
            "are not every k-th layer after a dense prefix",
        )
    every, first = pattern
    shared, gate = 0, False
    if kind == "qwen_shared":
        size = get("shared_expert_intermediate_size")
        if size % expert_dim:
            raise get.refuse(
                "shared_expert_intermediate_size",
                f"jaxlm's shared expert is a multiple of moe_intermediate_size={expert_dim}",
            )
        shared, gate = size // expert_dim, True
    jitter = get("router_jitter_noise") if kind == "mixtral" else 0.0
    moe = MoEConfig(
        num_experts=int(experts),
        top_k=int(get("num_experts_per_tok")),
        expert_mlp_dim=expert_dim if expert_dim != mlp_dim else None,
        num_shared_experts=shared,
        shared_expert_gate=gate,
        renormalize=renormalize,
        router_jitter=float(jitter),
        load_balance_weight=float(get("router_aux_loss_coef")),
        router_z_weight=0.0,  # transformers trains these families without a z-loss
        every=every,
        first_dense=first,
    )
    return moe, first == 0 and num_layers % every == 0


def _gpt2(get: _Reader) -> dict[str, Any]:
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if get.hf.get(key, ok) != ok:
            raise get.refuse(key, f"jaxlm supports only {key}={ok}")
    act = get("activation_function")
    if act not in PLAIN_ACTS:
        raise get.refuse("activation_function", f"supported: {sorted(PLAIN_ACTS)}")
    d = get("n_embd", "hidden_size")
    return dict(
        d_model=d,
        num_layers=get("n_layer", "num_hidden_layers"),
        num_heads=get("n_head", "num_attention_heads"),
        mlp_dim=get("n_inner") or 4 * d,
        activation=PLAIN_ACTS[act],
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(get("layer_norm_epsilon")),
        position="learned",
        max_seq_len=get("n_positions", "max_position_embeddings"),
        attn_bias=True,
        mlp_bias=True,
    )


def _encoder(get: _Reader) -> dict[str, Any]:
    """BERT / RoBERTa: post-LN bidirectional blocks, embedding norm, token types."""
    for key, ok in (("is_decoder", False), ("add_cross_attention", False)):
        if get.hf.get(key, ok) != ok:
            raise get.refuse(key, f"jaxlm imports encoders with {key}={ok}")
    if get("position_embedding_type") != "absolute":
        raise get.refuse("position_embedding_type", "only 'absolute' positions are supported")
    act = get("hidden_act")
    if act not in PLAIN_ACTS:
        raise get.refuse("hidden_act", f"supported: {sorted(PLAIN_ACTS)}")
    offset = position_offset(get.family, get.hf.get("pad_token_id"))
    max_len = get("max_position_embeddings") - offset
    if max_len < 1:
        raise get.refuse("max_position_embeddings", f"it must exceed the offset {offset}")
    return dict(
        d_model=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        mlp_dim=get("intermediate_size"),
        activation=PLAIN_ACTS[act],
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(get("layer_norm_eps")),
        norm_position="post",
        embed_norm=True,
        type_vocab_size=int(get("type_vocab_size")),
        causal=False,
        position="learned",
        max_seq_len=max_len,
        attn_bias=True,
        mlp_bias=True,
        depth_scaled_init=False,
    )


def _llama_like(get: _Reader) -> dict[str, Any]:
    fam = get.family
    d, n, layers = get("hidden_size"), get("num_attention_heads"), get("num_hidden_layers")
    act = get("hidden_act")
    if act not in GATED_ACTS:
        raise get.refuse("hidden_act", f"supported: {sorted(GATED_ACTS)}")
    # (q/k/v biases, output bias; None = same as q/k/v)
    attn_bias, out_bias = {
        "attention_bias": lambda: (bool(get("attention_bias")), None),
        "qkv": lambda: (True, False),
        "qkv_bias": lambda: (bool(get("qkv_bias")), False),
        "none": lambda: (False, None),
    }[fam.bias]()
    mlp_dim = get("intermediate_size")
    max_len = get("max_position_embeddings")
    moe, scannable = _moe(get, layers, mlp_dim) if fam.moe else (MoEConfig(), True)
    return dict(
        d_model=d,
        num_layers=layers,
        num_heads=n,
        num_kv_heads=get.optional("num_key_value_heads") or n,
        head_dim=get.optional("head_dim"),  # None: hidden_size // num_attention_heads
        mlp_dim=mlp_dim,
        activation=GATED_ACTS[act],
        norm="rmsnorm",
        norm_bias=False,
        norm_eps=float(get("rms_norm_eps")),
        max_seq_len=max_len,
        qk_norm=fam.qk_norm,
        sliding_window=_window(get, layers),
        attn_bias=attn_bias,
        attn_out_bias=out_bias,
        mlp_bias=bool(get("mlp_bias")) if fam.model_type == "llama" else False,
        moe=moe,
        scan_layers=scannable,
        **_rope(get, max_len),
    )


def model_config(
    hf: Mapping[str, Any], dtype: str = "float32", scan_layers: bool | None = None
) -> ModelConfig:
    """The `ModelConfig` of a config.json dict (`dtype` for both parameters and compute).

    `scan_layers` None scans whenever the layer pattern allows it.
    """
    family = family_of(hf)
    get = _Reader(hf, family)
    if family.encoder:
        kwargs = _encoder(get)
    else:
        kwargs = _gpt2(get) if family.model_type == "gpt2" else _llama_like(get)
    scannable = kwargs.pop("scan_layers", True)
    if scan_layers and not scannable:
        raise ValueError(
            f"this {family.model_type} model's MoE layers do not repeat one pattern, so its "
            "layers cannot be scanned; use scan_layers=False (or None)"
        )
    head = head_of(hf, family)
    return ModelConfig(
        vocab_size=get("vocab_size"),
        head=head,
        tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=float(get("initializer_range")),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scannable if scan_layers is None else scan_layers,
        **kwargs,
    )


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        params |= {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        params |= {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return params


def _window_fields(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    w, n = cfg.sliding_window, cfg.num_layers
    if family.window == "all":
        return {"sliding_window": w}
    if family.window == "all_if_used":
        return {"use_sliding_window": w is not None, "sliding_window": w}
    if family.window == "from_max":
        kind = "full_attention" if w is None else "sliding_attention"
        return {
            "use_sliding_window": w is not None,
            "sliding_window": w,
            "max_window_layers": n if w is None else 0,
            "layer_types": [kind] * n,
        }
    if family.window == "even_below_max":
        return {"use_sliding_window": False}
    return {}


def _moe_fields(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    m = cfg.moe
    if family.moe == "mixtral":
        return {
            "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "intermediate_size": cfg.expert_mlp_dim,
            "router_aux_loss_coef": m.load_balance_weight,
            "router_jitter_noise": m.router_jitter,
        }
    out = {
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "moe_intermediate_size": cfg.expert_mlp_dim,
        "norm_topk_prob": m.renormalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
        "router_aux_loss_coef": m.load_balance_weight,
    }
    if family.moe == "qwen_shared":
        out["shared_expert_intermediate_size"] = m.num_shared_experts * cfg.expert_mlp_dim
    return out


def hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dict of `cfg` as a Hugging Face model (see `export_family`)."""
    family = export_family(cfg, model_type)
    score = cfg.head == "score"
    common = {
        "model_type": family.model_type,
        "architectures": [score_architecture(family) if score else family.architecture],
        **(
            {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
            if score
            else {}
        ),
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": cfg.param_dtype,
    }
    if family.encoder:
        pad = family.defaults["pad_token_id"]
        return common | {
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.mlp_dim,
            "hidden_act": PLAIN_NAMES[cfg.activation],
            "max_position_embeddings": cfg.max_seq_len + position_offset(family, pad),
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "pad_token_id": pad,
        }
    if family.model_type == "gpt2":
        return common | {
            "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_seq_len,
            "activation_function": PLAIN_NAMES[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
        }
    out = common | {
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": GATED_NAMES[cfg.activation],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": _rope_parameters(cfg),
    }
    if family.bias == "attention_bias":
        out["attention_bias"] = cfg.attn_bias
    elif family.bias == "qkv_bias":
        out["qkv_bias"] = cfg.attn_bias
    if family.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    out |= _window_fields(cfg, family)
    if family.moe:
        out |= _moe_fields(cfg, family)
    return out
