"""A plain NumPy float64 Transformer forward pass, written independently of jaxlm's modules.

It reads a jaxlm parameter tree (unrolled layout: `layers_0`, `layers_1`, ...) and the config, and
recomputes the logits with explicit per-head loops, complex-number RoPE and per-row masks.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(tree):
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)


def _norm(x, p, cfg):
    if cfg.norm == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + cfg.norm_eps)
    else:
        y = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps)
    y = y * p["scale"]
    if cfg.norm_bias:
        y = y + p["bias"]
    return y


_erf = np.vectorize(math.erf)


def _act(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if name in ("gelu_tanh", "geglu"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0)
    if name == "swiglu":
        return x / (1 + np.exp(-x))
    raise ValueError(name)


def _rope_freqs(cfg):
    h = cfg.head_dim
    freqs = []
    for i in range(h // 2):
        f = cfg.rope_theta ** (-2 * i / h)
        if cfg.rope_scaling == "linear":
            f /= cfg.rope_scaling_factor
        elif cfg.rope_scaling == "llama3":
            wavelen = 2 * math.pi / f
            lo_wl = cfg.rope_original_max_len / cfg.rope_low_freq_factor
            hi_wl = cfg.rope_original_max_len / cfg.rope_high_freq_factor
            if wavelen > lo_wl:
                f /= cfg.rope_scaling_factor
            elif wavelen >= hi_wl:
                s = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
                    cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
                )
                f = (1 - s) * f / cfg.rope_scaling_factor + s * f
        freqs.append(f)
    return np.array(freqs)


def _rope(x_TH, pos_T, cfg):
    # Rotate-half convention: feature i pairs with feature i + H/2, as a complex number.
    half = cfg.head_dim // 2
    z = x_TH[:, :half] + 1j * x_TH[:, half:]
    z = z * np.exp(1j * pos_T[:, None] * _rope_freqs(cfg)[None, :])
    return np.concatenate([z.real, z.imag], axis=-1)


def _sinusoidal(pos_T, d):
    out = np.zeros((len(pos_T), d))
    for i in range(d // 2):
        w = 10000.0 ** (-2 * i / d)
        out[:, 2 * i] = np.sin(pos_T * w)
        out[:, 2 * i + 1] = np.cos(pos_T * w)
    return out


def _cap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def _width_ratio(cfg):
    """muP's m = d_model / base width (1 under SP)."""
    if cfg.parametrization != "mup":
        return 1.0
    return cfg.d_model / (cfg.mup_base_width or cfg.d_model)


def _attention_scale(cfg):
    # SP: 1/sqrt(h). muP: 1/h, times sqrt of the base model's head_dim (h / m), so that both
    # agree at the base width.
    h = cfg.head_dim
    if cfg.parametrization != "mup":
        return 1 / math.sqrt(h)
    return math.sqrt(cfg.mup_base_head_dim or h / _width_ratio(cfg)) / h


def _attention(x_TD, p, pos_T, seg_T, cfg, prefix_T=None):
    t = x_TD.shape[0]
    g = cfg.num_heads // cfg.num_kv_heads

    def proj(name):
        y = np.einsum("td,dnh->tnh", x_TD, p[name]["w"])
        return y + p[name]["b"] if cfg.attn_bias else y

    q, k, v = proj("query"), proj("key"), proj("value")
    visible = np.zeros((t, t), dtype=bool)
    for i in range(t):
        for j in range(t if not cfg.causal else i + 1):
            near = cfg.sliding_window is None or abs(i - j) < cfg.sliding_window
            visible[i, j] = seg_T[i] == seg_T[j] and near
    if prefix_T is not None:  # a prefix LM: prefix tokens also see the prefix after them
        for i in range(t):
            for j in range(t):
                near = cfg.sliding_window is None or abs(i - j) < cfg.sliding_window
                both = prefix_T[i] and prefix_T[j] and seg_T[i] == seg_T[j]
                visible[i, j] |= bool(both and near)
    heads = []
    for n in range(cfg.num_heads):
        qn, kn, vn = q[:, n], k[:, n // g], v[:, n // g]
        if cfg.qk_norm:
            qn, kn = _norm(qn, p["query_norm"], cfg), _norm(kn, p["key_norm"], cfg)
        if cfg.position == "rope":
            qn, kn = _rope(qn, pos_T, cfg), _rope(kn, pos_T, cfg)
        scores = _cap(qn @ kn.T * _attention_scale(cfg), cfg.attn_logit_softcap)
        scores = np.where(visible, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ vn)
    out = np.einsum("tnh,nhd->td", np.stack(heads, axis=1), p["out"]["w"])
    return out + p["out"]["b"] if cfg.use_attn_out_bias else out


def _mlp(x_TD, p, cfg):
    def up(name):
        y = x_TD @ p[name]["w"]
        return y + p[name]["b"] if cfg.mlp_bias else y

    h = _act(cfg.activation, up("gate")) * up("up") if cfg.gated else _act(cfg.activation, up("up"))
    out = h @ p["down"]["w"]
    return out + p["down"]["b"] if cfg.mlp_bias else out


def forward(
    params,
    tokens_BT,
    cfg,
    segment_ids_BT=None,
    positions_BT=None,
    token_types_BT=None,
    prefix_BT=None,
):
    """Logits [B, T, V] in float64 for unrolled-layout `params` (`prefix_BT`: a prefix LM's
    bidirectional prefix tokens)."""
    p = _f64(params)
    tokens_BT = np.asarray(tokens_BT)
    b, t = tokens_BT.shape
    out = []
    for row in range(b):
        seg = np.ones(t, int) if segment_ids_BT is None else np.asarray(segment_ids_BT[row])
        if positions_BT is None:
            pos = np.zeros(t)
            for i in range(1, t):
                pos[i] = pos[i - 1] + 1 if seg[i] == seg[i - 1] else 0
        else:
            pos = np.asarray(positions_BT[row], dtype=np.float64)
        x = p["embed"]["embedding"][tokens_BT[row]]
        if cfg.position == "learned":
            x = x + p["pos_embed"]["embedding"][pos.astype(int)]
        elif cfg.position == "sinusoidal":
            x = x + _sinusoidal(pos, cfg.d_model)
        if cfg.type_vocab_size:
            types = np.zeros(t, int) if token_types_BT is None else np.asarray(token_types_BT[row])
            x = x + p["type_embed"]["embedding"][types]
        if cfg.embed_norm:
            x = _norm(x, p["embed_norm"], cfg)
        pre = None if prefix_BT is None else np.asarray(prefix_BT[row], bool)
        for i in range(cfg.num_layers):
            layer = p[f"layers_{i}"]
            if cfg.norm_position == "pre":
                h = _norm(x, layer["attn_norm"], cfg)
                x = x + _attention(h, layer["attn"], pos, seg, cfg, pre)
                x = x + _mlp(_norm(x, layer["mlp_norm"], cfg), layer["mlp"], cfg)
            else:  # post-LN: normalise each residual sum
                h = _attention(x, layer["attn"], pos, seg, cfg, pre)
                x = _norm(x + h, layer["attn_norm"], cfg)
                x = _norm(x + _mlp(x, layer["mlp"], cfg), layer["mlp_norm"], cfg)
        if cfg.norm_position == "pre":
            x = _norm(x, p["final_norm"], cfg)
        if cfg.head == "mlm":
            head = p["mlm_transform"]
            x = x @ head["dense"]["w"] + head["dense"]["b"]
            x = _norm(_act(cfg.activation, x), head["norm"], cfg)
        unembed = p["embed"]["embedding"].T if cfg.tie_embeddings else p["unembed"]["w"]
        logits = x @ unembed / _width_ratio(cfg)  # muP's output multiplier 1/m
        if cfg.head == "mlm":
            logits = logits + p["output_bias"]
        out.append(_cap(logits, cfg.final_logit_softcap))
    return np.stack(out)
