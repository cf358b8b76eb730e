"""Multi-head attention with grouped kv heads (MHA/GQA/MQA), masks, QK-norm and logit soft-cap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm.configs.model import ModelConfig
from jaxlm.model import context, kv_cache, mup
from jaxlm.model.attend import attend
from jaxlm.model.fused_attention import Segments, fused_attention
from jaxlm.model.layers import Einsum, kernel_init, make_norm
from jaxlm.model.positions import apply_rope
from jaxlm.sharding import constrain


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes."""
    t = segment_ids_BT.shape[1]
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BT.shape)
    changed = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    start = jax.lax.cummax(jnp.where(changed, index, 0), axis=1)
    return index - start


class Attention(nn.Module):
    """Self-attention over a [B, T, D] input, with N query heads sharing K kv heads."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        mask_BTS: jax.Array | Segments,
        kv: kv_cache.LayerSlot | None = None,
    ) -> tuple[jax.Array, kv_cache.LayerSlot | None]:
        """(output [B, T, D], updated cache slot or None).

        Without a cache, keys are this call's own T tokens and `mask_BTS` is [B, T, T]; for a
        causal model (`config.causal`) it must be causal by index (key s hidden from query t
        whenever s > t; `attend` skips such blocks), for a bidirectional one it may be any mask.
        With a cache slot `kv` (this layer of the stacked (k, v) arrays [L, B, K, S, H], int8
        ones with their scales), the new keys and values are written at slots positions[b, 0]
        .. positions[b, 0] + T - 1 and the queries attend over all S slots (`mask_BTS` is
        [B, T, S]).

        `mask_BTS` may instead be `Segments`: self-attention over this call's own T tokens
        (also with a cache: a prefill into an empty one) by the fused kernel of
        `config.attention_impl`; or `context.MaskParts`: self-attention with the sequence split
        over the mesh's `context` axis, each shard building the mask blocks it needs.
        """
        cfg = self.config
        d, n, k, h, g = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
        dt = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)

        def project(name: str, heads: int, axis: str) -> jax.Array:
            w = Einsum(
                (d, heads, h),
                ("embed", axis, "head_dim"),
                kernel_init(cfg, 0, (1, 2)),
                cfg.attn_bias,
                name=name,
                lora=cfg.lora if cfg.lora.adapts(name) else None,
                quant=cfg.quant,
                **dt,
            )
            y = w("BTD,DNH->BTNH", x_BTD)
            # Named so that the "save_qkv_proj" remat policy can keep exactly these.
            return checkpoint_name(y, f"{name}_proj")

        q_BTNH = project("query", n, "heads")
        k_BSKH = project("key", k, "kv_heads")
        v_BSKH = project("value", k, "kv_heads")
        if cfg.qk_norm:
            q_BTNH = make_norm(cfg, "query_norm", axis_name="head_dim")(q_BTNH)
            k_BSKH = make_norm(cfg, "key_norm", axis_name="head_dim")(k_BSKH)
        if cfg.position == "rope":
            q_BTNH = apply_rope(q_BTNH, positions_BT, cfg)
            k_BSKH = apply_rope(k_BSKH, positions_BT, cfg)
        q_BTNH = constrain(q_BTNH, ("act_batch", "act_length", "act_heads", "head_dim"))
        k_BSKH = constrain(k_BSKH, ("act_batch", "act_length", "act_kv_heads", "head_dim"))
        v_BSKH = constrain(v_BSKH, ("act_batch", "act_length", "act_kv_heads", "head_dim"))
        own_k_BTKH, own_v_BTKH = k_BSKH, v_BSKH
        if kv is not None:
            ring = kv_cache.is_ring(cfg, kv.arrays[0].shape[3])
            kv = kv_cache.update(kv, k_BSKH, v_BSKH, positions_BT[:, 0], ring)
            # Read as [B, K, S, H]; XLA folds the swap into attention's matmuls.
            k_BSKH, v_BSKH = (jnp.swapaxes(x, 1, 2) for x in kv_cache.read(kv, cfg.dtype))

        b, t = q_BTNH.shape[:2]
        scale = mup.attention_scale(cfg)  # 1/sqrt(h); muP: sqrt(h0)/h
        if isinstance(mask_BTS, Segments):
            q_BTNH = (q_BTNH * scale).astype(q_BTNH.dtype)
            out_BTNH = fused_attention(q_BTNH, own_k_BTKH, own_v_BTKH, mask_BTS.ids_BT, cfg)
        elif isinstance(mask_BTS, context.MaskParts) or (kv is None and context.size(t) > 1):
            # The sequence split over `context` (a dense mask: a prefix LM's, prompt tuning's).
            q_BTNH = (q_BTNH * scale).astype(q_BTNH.dtype)
            out_BTNH = context.context_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                mask_BTS,
                cfg.attn_logit_softcap,
                cfg.context_attention,
                cfg.sliding_window,
                cfg.causal,
            )
        else:
            q_BKGTH = jnp.transpose((q_BTNH * scale).reshape(b, t, k, g, h), (0, 2, 3, 1, 4))
            # Without a cache a causal model's mask is causal by index, so blocks may be
            # skipped (not a prefix LM's: a prefix sees the keys after it).
            causal = kv is None and cfg.causal and not cfg.prefix_lm
            out_BKGTH = attend(
                q_BKGTH, k_BSKH, v_BSKH, mask_BTS, cfg.attn_logit_softcap, causal=causal
            )
            out_BTNH = jnp.transpose(out_BKGTH, (0, 3, 1, 2, 4)).reshape(b, t, n, h)
        out_BTNH = constrain(out_BTNH, ("act_batch", "act_length", "act_heads", "head_dim"))
        out = Einsum(
            (n, h, d),
            ("heads", "head_dim", "embed"),
            kernel_init(cfg, (0, 1), 2, output_projection=True),
            cfg.use_attn_out_bias,
            name="out",
            lora=cfg.lora if cfg.lora.adapts("out") else None,
            quant=cfg.quant,
            **dt,
        )
        out_BTD = out("BTNH,NHD->BTD", out_BTNH)
        return constrain(out_BTD, ("act_batch", "act_length", "act_embed")), kv
