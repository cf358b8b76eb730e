"""`Block` and `Transformer`: embed → scanned (or unrolled) pre-norm blocks → norm → logits."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import sharding
from jaxlm.configs.model import CPU_UNROLL_MAX_LAYERS, ModelConfig
from jaxlm.model import context, fused_attention, kv_cache, mup, pipeline
from jaxlm.model.attend import attention_mask, softcap
from jaxlm.model.attention import Attention, segment_positions
from jaxlm.model.layers import Einsum, Embed, kernel_init, make_norm
from jaxlm.model.mlp import ACTIVATIONS, MLP
from jaxlm.model.moe import MoE
from jaxlm.model.positions import LearnedPositions, sinusoidal

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
}


def residual_dropout(module: nn.Module, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """`cfg.dropout` on x while training (the module has a "dropout" rng); x otherwise."""
    if not cfg.dropout or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - cfg.dropout, x.shape)
    return jnp.where(keep, x / (1 - cfg.dropout), 0).astype(x.dtype)


class Block(nn.Module):
    """Pre-LN: x + attn(norm(x)), then x + mlp(norm(x)); post-LN (`norm_position="post"`):
    norm(x + attn(x)), then norm(x + mlp(x)). Returns (x, aux) so it can be scanned."""

    config: ModelConfig
    moe: bool = False  # a Mixture-of-Experts feed-forward instead of the dense MLP

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array | tuple[jax.Array, kv_cache.Layer, jax.Array],
        positions_BT: jax.Array,
        mask_BTS: jax.Array,
        kv: kv_cache.LayerSlot | None = None,
    ) -> tuple[Any, tuple[dict[str, jax.Array], Any]]:
        """(x, (aux, updated cache slot or None)). Scanned over layers with a cache, the carry
        is (x, the stacked cache arrays, this layer's index): `_carried`."""
        x_BTD, kv, carried = _carried(x_BTD, kv)
        cfg = self.config
        attn_norm, mlp_norm = make_norm(cfg, "attn_norm"), make_norm(cfg, "mlp_norm")
        pre = cfg.norm_position == "pre"
        h = attn_norm(x_BTD) if pre else x_BTD
        attn_BTD, kv = Attention(cfg, name="attn")(h, positions_BT, mask_BTS, kv)
        x_BTD = x_BTD + residual_dropout(self, cfg, attn_BTD)
        if not pre:  # post-LN: the norm follows the residual sum
            x_BTD = attn_norm(x_BTD)
        h = mlp_norm(x_BTD) if pre else x_BTD
        aux: dict[str, jax.Array] = {}
        if self.moe:
            ff_BTD, aux = MoE(cfg, name="moe")(h)
        else:
            ff_BTD = MLP(cfg, name="mlp")(h)
        x_BTD = x_BTD + residual_dropout(self, cfg, ff_BTD)
        if not pre:
            x_BTD = mlp_norm(x_BTD)
        x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
        if carried:
            return (x_BTD, kv.arrays, kv.index + 1), (aux, None)
        return x_BTD, (aux, kv)


def _carried(
    x: jax.Array | tuple[jax.Array, kv_cache.Layer, jax.Array], kv: kv_cache.LayerSlot | None
) -> tuple[jax.Array, kv_cache.LayerSlot | None, bool]:
    """(x, the cache slot, whether the scan carries the cache). Scanned with a cache, a block (or
    group) takes (x, stacked cache arrays, index) as its carry and returns the arrays updated in
    place with index + 1, so the scan neither slices layers out of the cache nor restacks them."""
    if isinstance(x, tuple):
        x_BTD, arrays, index = x
        return x_BTD, kv_cache.LayerSlot(arrays, index), True
    return x, kv, False


def _run_blocks(
    blocks: list[nn.Module],
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    mask_BTS: jax.Array,
    kv: kv_cache.Layer | None,
    first: jax.Array | int = 0,
) -> tuple[jax.Array, list[dict[str, jax.Array]], kv_cache.Layer | None]:
    """Apply `blocks` in order, block j on layer `first + j` of the stacked cache arrays `kv`.

    Returns (x, the non-empty aux dicts in layer order, the updated cache arrays or None).
    """
    auxes = []
    for j, block in enumerate(blocks):
        slot = None if kv is None else kv_cache.LayerSlot(kv, first + j)
        x_BTD, (aux_j, slot) = block(x_BTD, positions_BT, mask_BTS, slot)
        if aux_j:
            auxes.append(aux_j)
        if slot is not None:
            kv = slot.arrays
    return x_BTD, auxes, kv


class BlockGroup(nn.Module):
    """`every` consecutive blocks, the last one MoE: the unit scanned when MoE layers are sparse."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array | tuple[jax.Array, kv_cache.Layer, jax.Array],
        positions_BT: jax.Array,
        mask_BTS: jax.Array,
        kv: kv_cache.LayerSlot | None = None,
    ) -> tuple[Any, tuple[dict[str, jax.Array], Any]]:
        """As `Block`, the slot's index counting groups (group g holds layers g * every ...)."""
        x_BTD, slot, carried = _carried(x_BTD, kv)
        every = self.config.moe.every
        blocks = [Block(self.config, moe=j == every - 1, name=f"block_{j}") for j in range(every)]
        arrays, first = (None, 0) if slot is None else (slot.arrays, slot.index * every)
        x_BTD, auxes, arrays = _run_blocks(blocks, x_BTD, positions_BT, mask_BTS, arrays, first)
        if carried:
            return (x_BTD, arrays, slot.index + 1), (auxes[0], None)
        slot = None if slot is None else kv_cache.LayerSlot(arrays, slot.index)
        return x_BTD, (auxes[0], slot)  # the group's one MoE block


def _pad_prompt(prefix_BT: jax.Array, p: int) -> jax.Array:
    """The prefix mask with the P prompt-tuning slots before it: not part of the prefix (they
    see only each other, causally; every token sees them)."""
    return jnp.pad(prefix_BT.astype(bool), ((0, 0), (p, 0)), constant_values=False)


def _prefix_mask(
    q_index_BT: jax.Array,
    k_index_BS: jax.Array,
    q_prefix_BT: jax.Array,
    k_prefix_BS: jax.Array,
    q_segment_BT: jax.Array,
    k_segment_BS: jax.Array,
    cfg: ModelConfig,
) -> jax.Array:
    """[B, T, S]: bidirectional visibility between prefix queries and prefix keys of the same
    segment (and window): `attention_mask` with the non-prefix tokens in segments of their own
    (-2 for queries, -3 for keys) that nothing matches."""
    q_seg_BT = jnp.where(q_prefix_BT, q_segment_BT, -2)
    k_seg_BS = jnp.where(k_prefix_BS, k_segment_BS, -3)
    return attention_mask(
        q_index_BT, k_index_BS, q_seg_BT, k_seg_BS, cfg.sliding_window, causal=False
    )


class Transformer(nn.Module):
    """A Transformer: a decoder (causal attention) or, with `config.causal=False`, an encoder
    (bidirectional attention within each segment). Call with tokens [B, T]; returns (logits
    [B, T, V], cache, aux) (with `config.head="score"`: scores [B, T, 1] in place of the logits;
    with `config.value_head`, aux["values"] [B, T] float32 holds the value head's outputs).

    `segment_ids` (default all ones) separate packed sequences; id 0 marks padding. Positions
    default to restarting at 0 in each segment. `token_types` [B, T] (default all zeros) pick
    token-type embeddings, for models with `config.type_vocab_size` > 0 (BERT's sentence A/B).
    `aux` holds auxiliary per-layer outputs (e.g. MoE losses), empty for dense models.

    With a `KVCache`, the T tokens of row b are the ones at positions cache.lengths[b] ..
    cache.lengths[b] + T - 1 (unless `positions` says otherwise); their keys and values are
    written to the cache, they attend causally to everything before them in the row, and the
    returned cache has `lengths` = last position + 1. `segment_ids` must be None then, and the
    model causal. `prefill=True` marks the call that fills an empty cache from position 0 (its
    positions are 0 .. T - 1): it writes the prompt-tuning slots, and its attention over the
    cache is attention over its own tokens, so a fused kernel (`config.attention_impl`) can
    compute it.

    A prefix LM (`config.prefix_lm`) takes `prefix` [B, T] booleans: the tokens of each
    segment's prefix, which attend to the whole prefix (before and after them) instead of only
    the tokens before them. With a cache, the prefix must be in one call (the prefill).

    `hidden=True` returns the last hidden states [B, T, D] (after the final norm) in place of
    the head's output; `logits_at` [B, K] (token indices) runs the head on those K positions of
    each row only (masked LM's chosen tokens) and returns [B, K, ...]. `config.dropout` applies
    when the call has a "dropout" rng.

    Under muP (`config.parametrization="mup"`), `init` rescales each weight SP's initializers
    drew by its muP multiplier (`jaxlm.model.mup`), and the logits are multiplied by base / width.
    """

    config: ModelConfig

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        variables = super().init(rngs, *args, **kwargs)
        return mup.rescale_init(self.config, variables)

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: Any = None,
        prefill: bool = False,
        token_types_BT: jax.Array | None = None,
        prefix_BT: jax.Array | None = None,
        hidden: bool = False,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        cfg = self.config
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens_BT.shape}")
        if token_types_BT is not None and not cfg.type_vocab_size:
            raise ValueError(
                "token_types were given, but this model has no token-type embeddings "
                "(model.type_vocab_size=0)"
            )
        if prefix_BT is not None and not cfg.prefix_lm:
            raise ValueError(
                "a prefix was given, but this model is not a prefix LM (model.prefix_lm=False)"
            )
        b, t = tokens_BT.shape
        if t + cfg.prompt_tokens > cfg.max_seq_len:
            extra = f" + {cfg.prompt_tokens} prompt-tuning tokens" * bool(cfg.prompt_tokens)
            raise ValueError(f"sequence length {t}{extra} exceeds max_seq_len={cfg.max_seq_len}")
        p = cfg.prompt_tokens
        # Prompt tuning: P learned embeddings before every row, at positions 0..P-1 (the tokens'
        # positions move up by P); with a cache they are written by the prefill call only.
        prepend = p > 0 and (cache is None or prefill)
        order = None  # the blocks' order of the positions, when it is not theirs (`context`)
        if cache is not None:
            if not cfg.causal:
                raise ValueError(
                    "a bidirectional model (model.causal=False) cannot decode with a KV cache: "
                    "every token's output depends on the tokens after it"
                )
            if segment_ids_BT is not None:
                raise ValueError("segment_ids cannot be combined with a KV cache")
            if t + prepend * p > cache.max_length:
                raise ValueError(f"{t} tokens do not fit a cache of length {cache.max_length}")
            if positions_BT is None:  # cache.lengths count the prompt's slots too
                positions_BT = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
            else:
                positions_BT = positions_BT + p
            if prepend:
                prompt_pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
                positions_BT = jnp.concatenate([prompt_pos, positions_BT], axis=1)
            # Keys are cache slots; slot s holds position s of the row (in a ring buffer, the
            # newest position that is s modulo its length; -1 where none was written).
            ring = kv_cache.is_ring(cfg, cache.max_length)
            if ring and t > 1 and not prefill:
                raise ValueError(
                    f"a ring-buffer cache (model.sliding_window={cfg.sliding_window} slots) takes "
                    f"one token per call after the prefill, not {t}"
                )
            slots_BS = kv_cache.slot_positions(positions_BT[:, -1], cache.max_length, ring)
            if ring:  # slots not written yet: never visible (a position past every query)
                slots_BS = jnp.where(slots_BS >= 0, slots_BS, jnp.iinfo(jnp.int32).max)
            ones = jnp.ones((b, 1), jnp.int32)
            mask_BTS = attention_mask(positions_BT, slots_BS, ones, ones, cfg.sliding_window)
            if prefix_BT is not None:
                # Prefix tokens (all in this call, e.g. a prefill) also see the prefix after them.
                prefix_BT = _pad_prompt(prefix_BT, p) if prepend else prefix_BT
                end_B = jnp.max(jnp.where(prefix_BT, positions_BT + 1, 0), axis=1)
                in_prefix_BS = slots_BS < end_B[:, None]
                mask_BTS = mask_BTS | _prefix_mask(
                    positions_BT, slots_BS, prefix_BT, in_prefix_BS, ones, ones, cfg
                )
            # A prefill writes positions 0 .. T - 1 of an empty cache: attending over the cache
            # is attending over its own tokens, which a fused kernel can do.
            impl = fused_attention.call_impl(
                cfg, t + prepend * p, prefill, prepend or prefix_BT is not None
            )
            if impl != "xla":
                mask_BTS = fused_attention.Segments(None)
        else:
            packed = segment_ids_BT is not None
            if segment_ids_BT is None:
                segment_ids_BT = jnp.ones((b, t), jnp.int32)
            if positions_BT is None:
                positions_BT = segment_positions(segment_ids_BT)
            if prepend:
                positions_BT = jnp.concatenate(
                    [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), positions_BT + p],
                    axis=1,
                )
                # The prompt is its own segment (-1) that every non-padding token also sees.
                segment_ids_BT = jnp.concatenate(
                    [jnp.full((b, p), -1, jnp.int32), segment_ids_BT], axis=1
                )
            n = t + prepend * p
            order = _balanced_order(cfg, n)
            # The mask in the blocks' order (see `context`), built from reordered positions and
            # segments, not reordered as a [B, T, T] array.
            index_BT = _reorder(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), order)
            seg_BT = _reorder(segment_ids_BT, order)
            mask_BTS = attention_mask(
                index_BT, index_BT, seg_BT, seg_BT, cfg.sliding_window, cfg.causal
            )
            if prepend:
                sees_prompt = (index_BT[:, None, :] < p) & (seg_BT[:, :, None] > 0)
                mask_BTS = mask_BTS | sees_prompt
            if prefix_BT is not None:
                # Within a segment, prefix tokens see each other (before and after).
                prefix_BT = _reorder(_pad_prompt(prefix_BT, p) if prepend else prefix_BT, order)
                mask_BTS = mask_BTS | _prefix_mask(
                    index_BT, index_BT, prefix_BT, prefix_BT, seg_BT, seg_BT, cfg
                )
            impl = fused_attention.call_impl(cfg, n, True, prepend or prefix_BT is not None)
            if context.size(n) > 1:  # the sequence split over the context shards
                impl = "xla"
                if prepend or prefix_BT is not None:  # the dense mask, split by rows
                    mask_BTS = sharding.constrain(mask_BTS, ("act_batch", "act_length", None))
                else:  # each shard builds the blocks of it that it needs
                    mask_BTS = context.MaskParts(index_BT, seg_BT)
            if impl != "xla":  # the kernel builds its own mask from the segment ids
                mask_BTS = fused_attention.Segments(segment_ids_BT if packed else None)

        embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            cfg.init_std,
            cfg.dtype,
            cfg.param_dtype,
            quant=cfg.quant,
            name="embed",
        )
        x_BTD = embed(tokens_BT)
        if prepend:
            prompt_PD = self.param(
                "prompt_embedding",
                nn.with_logical_partitioning(
                    jax.nn.initializers.normal(cfg.init_std), (None, "embed")
                ),
                (p, cfg.d_model),
                jnp.float32,
            )
            prompt_BPD = jnp.broadcast_to(prompt_PD.astype(cfg.dtype), (b, p, cfg.d_model))
            x_BTD = jnp.concatenate([prompt_BPD, x_BTD], axis=1)
        if cfg.position == "learned":
            x_BTD = x_BTD + LearnedPositions(cfg, name="pos_embed")(positions_BT)
        elif cfg.position == "sinusoidal":
            x_BTD = x_BTD + sinusoidal(positions_BT, cfg.d_model, cfg.dtype)
        if cfg.type_vocab_size:
            types = Embed(
                cfg.type_vocab_size,
                cfg.d_model,
                cfg.init_std,
                cfg.dtype,
                cfg.param_dtype,
                axes=(None, "embed"),
                name="type_embed",
            )
            if token_types_BT is None:
                token_types_BT = jnp.zeros((b, t), jnp.int32)
            types_BTD = types(token_types_BT)
            if prepend:  # the prompt-tuning embeddings carry no token type
                types_BTD = jnp.pad(types_BTD, ((0, 0), (p, 0), (0, 0)))
            x_BTD = x_BTD + types_BTD
        if cfg.embed_norm:
            x_BTD = make_norm(cfg, "embed_norm")(x_BTD)
        x_BTD = residual_dropout(self, cfg, x_BTD)
        # Causal load balancing over the context shards: the blocks see the sequence in an order
        # where each shard holds an early and a late chunk; positions (and the mask) go with it.
        if order is not None:
            x_BTD, positions_BT = x_BTD[:, order], positions_BT[:, order]
        x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

        grouped = cfg.moe.enabled and cfg.moe.every > 1 and cfg.scan_layers
        unit = BlockGroup if grouped else Block
        if cfg.remat != "none":
            # Under scan, XLA cannot CSE across iterations, so prevent_cse is unnecessary there.
            unit = nn.remat(unit, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        kv = None if cache is None else cache.arrays
        if cfg.scan_layers:
            every = cfg.moe.every if grouped else 1
            length = cfg.num_layers // every
            layers = nn.scan(
                unit,
                variable_axes={"params": 0},
                split_rngs={"params": True, "router": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=length,
                unroll=scan_unroll(cfg, length),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kwargs = {} if grouped else {"moe": cfg.moe.enabled}
            stages = pipeline.stages()
            microbatches = pipeline.microbatches(cfg, stages)
            if (
                stages > 1 and kv is None and not self.is_initializing() and b % microbatches == 0
            ):  # the layers split into stages over `stage` (`pipeline`)
                block = (BlockGroup if grouped else Block)(cfg, **kwargs)

                def layer(p: Any, h: jax.Array, rows: Any) -> tuple[jax.Array, Any]:
                    h, (aux_l, _) = block.apply({"params": p}, h, *rows, None)
                    return h, aux_l

                names = None
                if cfg.pipeline_gather_weights:  # each weight's logical axes, past `layers`
                    names = jax.tree.map(
                        lambda b: tuple(b.names[1:]) if hasattr(b, "names") else None,
                        abstract_params(cfg)["layers"],
                        is_leaf=lambda b: hasattr(b, "names"),
                    )
                x_BTD, aux = pipeline.run(
                    layer,
                    nn.meta.unbox(self.variables["params"]["layers"]),
                    x_BTD,
                    (positions_BT, mask_BTS),
                    num_microbatches=microbatches,
                    repeats=cfg.pipeline_repeats,
                    policy=None if cfg.remat == "none" else REMAT_POLICIES[cfg.remat],
                    gather=names,
                    dtype=jnp.dtype(cfg.dtype),
                )
            else:
                # With a cache, the carry holds the stacked cache arrays and the layer index.
                carry = x_BTD if kv is None else (x_BTD, kv, jnp.zeros((), jnp.int32))
                carry, (aux, _) = layers(cfg, name="layers", **kwargs)(
                    carry, positions_BT, mask_BTS, None
                )
                x_BTD, kv = (carry, None) if kv is None else carry[:2]
        else:
            blocks = [
                unit(cfg, moe=cfg.is_moe_layer(i), name=f"layers_{i}")
                for i in range(cfg.num_layers)
            ]
            x_BTD, per_layer, kv = _run_blocks(blocks, x_BTD, positions_BT, mask_BTS, kv)
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else {}
        if cache is not None:
            cache = cache.with_arrays(kv, positions_BT[:, -1] + 1)
        if order is not None:  # back to the sequence's own order, split over context again
            x_BTD = x_BTD[:, np.argsort(order)]
            x_BTD = sharding.constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

        if cfg.norm_position == "pre":  # post-LN blocks end in a norm already
            x_BTD = make_norm(cfg, "final_norm")(x_BTD)
        if hidden:  # the last hidden states (e.g. for sentence embeddings), no head
            return (x_BTD[:, p:] if prepend else x_BTD), cache, aux
        if logits_at is not None:  # the head on K positions per row only: [B, K, ...] out
            at_BK = logits_at + p if prepend else logits_at
            x_BTD = jnp.take_along_axis(x_BTD, at_BK[..., None].astype(jnp.int32), axis=1)
            prepend = False  # the prompt slots are not among the gathered positions
        if cfg.head == "score":
            scores_BT1 = _scalar_head(cfg, "score")("BTD,DO->BTO", x_BTD)
            return (scores_BT1[:, p:] if prepend else scores_BT1), cache, aux
        if cfg.value_head:  # PPO's critic, on the policy's last hidden states
            values_BT = _scalar_head(cfg, "value")("BTD,DO->BTO", x_BTD)[..., 0]
            values_BT = values_BT.astype(jnp.float32)
            aux = {**aux, "values": values_BT[:, p:] if prepend else values_BT}
        if cfg.head == "mlm":
            x_BTD = MLMTransform(cfg, name="mlm_transform")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            unembed = Einsum(
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                kernel_init(cfg, 0, 1),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                quant=cfg.quant if cfg.quant.embed else None,
                name="unembed",
            )
            logits_BTV = unembed("BTD,DV->BTV", x_BTD)
        if cfg.head == "mlm":
            bias_V = self.param(
                "output_bias",
                nn.with_logical_partitioning(jax.nn.initializers.zeros, ("vocab",)),
                (cfg.vocab_size,),
                cfg.param_dtype,
            )
            logits_BTV = logits_BTV + bias_V.astype(logits_BTV.dtype)[None, None, :]
        if prepend:
            logits_BTV = logits_BTV[:, p:]
        if (mult := mup.output_multiplier(cfg)) != 1.0:
            logits_BTV = logits_BTV * jnp.asarray(mult, logits_BTV.dtype)
        logits_BTV = softcap(logits_BTV, cfg.final_logit_softcap)
        logits_BTV = sharding.constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))
        return logits_BTV, cache, aux


def _balanced_order(cfg: ModelConfig, length: int) -> np.ndarray | None:
    """The order the blocks see a causal sequence of `length` in when it is split over context
    shards with load balancing (`context.balanced_order`), else None (their own order)."""
    shards = context.size()
    if shards == 1 or not (cfg.causal and cfg.context_load_balance) or length % (2 * shards):
        return None
    return context.balanced_order(length, shards)


def _reorder(x_BT: jax.Array, order: np.ndarray | None) -> jax.Array:
    return x_BT if order is None else x_BT[:, order]


class MLMTransform(nn.Module):
    """BERT's masked-LM head before the unembedding: norm(act(x W + b)), W [d_model, d_model]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        dense = Einsum(
            (cfg.d_model, cfg.d_model),
            ("embed", None),
            kernel_init(cfg, 0, 1),
            use_bias=True,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="dense",
        )
        h_BTD = ACTIVATIONS[cfg.activation](dense("BTD,DE->BTE", x_BTD))
        return make_norm(cfg, "norm")(h_BTD)


def scan_unroll(cfg: ModelConfig, length: int) -> int:
    """Iterations of the `length`-step layer loop to unroll (`ModelConfig.scan_unroll`)."""
    if cfg.scan_unroll is not None:
        return min(cfg.scan_unroll, length)
    cpu = sharding.platform() == "cpu"  # the target's: a TPU compile from a CPU host is TPU
    return length if cpu and cfg.num_layers <= CPU_UNROLL_MAX_LAYERS else 1


def _scalar_head(cfg: ModelConfig, name: str) -> Einsum:
    """A [d_model, 1] projection of the last hidden states (a reward or value head)."""
    return Einsum(
        (cfg.d_model, 1),
        ("embed", None),
        kernel_init(cfg, 0, 1),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


def abstract_params(config: ModelConfig) -> Any:
    """Parameter shapes and logical axes (boxed `ShapeDtypeStruct`s); allocates nothing."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)
    return variables["params"]


def param_shardings(
    config: ModelConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules | str
) -> Any:
    """A tree of `NamedSharding`s for the parameters of `config` under `rules` on `mesh`."""
    rules = sharding.get_rules(rules) if isinstance(rules, str) else rules
    return sharding.logical_to_sharding(abstract_params(config), mesh, rules)


def init_params(
    config: ModelConfig,
    rng: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | str = "fsdp",
) -> Any:
    """Initialise parameters (a plain pytree), each created directly in its sharding on `mesh`.

    Nothing is ever materialised whole on one device: the init function is jitted with
    `out_shardings`, so each device computes only its own shards.
    """
    model = Transformer(config)

    def init(key: jax.Array) -> Any:
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(model.init(key, tokens)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = param_shardings(config, mesh, rules)
    with sharding.use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)
