"""Fused attention kernels: splash (Pallas, TPU) and cuDNN (GPU), chosen per backend.

`model.attention_impl` picks how self-attention is computed. "xla" is `attend.py` (einsums over
a dense [B, T, S] mask; the reference). A fused kernel never materialises the [T, S] scores: it
walks query x key blocks with an online softmax and skips blocks the mask hides entirely.

- "splash": `jax.experimental.pallas.ops.tpu.splash_attention`, one kernel per example
  (vmapped over the batch) inside a `shard_map` over the mesh axes the logical rules give the
  batch and the heads. Its static mask is causal, a window (`LocalMask`) or full; packed
  sequences travel as segment ids. Off TPU it runs in Pallas interpret mode (slow; for checks).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
- "auto": splash on TPU and cuDNN on GPU where the kernel can express the config and the call,
  "xla" elsewhere (`describe` says which and why).

The caller (`Transformer`) decides per call with `call_impl`: only self-attention over the
call's own tokens (training, scoring, a prefill into an empty cache) can use a kernel; decode
steps and masks a kernel has no form for (a prefix LM's prefix, prompt-tuning slots) use "xla".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlm import sharding
from jaxlm.configs.model import ModelConfig

LANES = 128  # splash tiles are multiples of the TPU's lane width
_PAD_SEGMENT = -(2**30)  # the id of the positions added to fill the last tile
KERNELS = {"tpu": "splash", "gpu": "cudnn"}


class Segments(NamedTuple):
    """In place of a dense mask: self-attention over the call's own T tokens, causal (or not)
    and windowed as the config says, within segments `ids_BT` ([B, T], 0 = padding, which sees
    only padding), or a single segment per row when `ids_BT` is None."""

    ids_BT: jax.Array | None


def describe(cfg: ModelConfig, seq_len: int, on: str | None = None) -> tuple[str, str]:
    """(the implementation a self-attention call over `seq_len` tokens uses on platform `on`
    (default: the current one), why). Raises for an explicit kernel the platform lacks."""
    on = on or sharding.platform()
    impl = cfg.attention_impl
    if impl == "xla":
        return "xla", "model.attention_impl='xla'"
    if impl == "cudnn" and on != "gpu":
        raise ValueError(
            f"model.attention_impl='cudnn' needs a GPU, but this runs on {on!r}; use "
            "attention_impl='auto' (the fused kernel where there is one) or 'xla'"
        )
    if impl == "splash" and on == "gpu":
        raise ValueError(
            "model.attention_impl='splash' is a TPU kernel and cannot run on 'gpu'; use "
            "attention_impl='cudnn' or 'auto'"
        )
    if impl == "splash":
        bq, bkv = block_sizes(cfg, seq_len)
        how = "Pallas interpret mode" if on != "tpu" else "the Pallas TPU kernel"
        return "splash", f"model.attention_impl='splash', {how}, blocks q {bq} / kv {bkv}"
    if impl == "cudnn":
        return "cudnn", "model.attention_impl='cudnn'"
    kernel = KERNELS.get(on)
    if kernel is None:
        return "xla", f"auto: no fused kernel on {on!r}"
    blocker = cfg.fused_attention_blocker(kernel)
    if blocker:
        return "xla", f"auto: {kernel} cannot express {blocker}"
    if kernel == "splash" and seq_len % LANES:
        return "xla", f"auto: sequence length {seq_len} is not a multiple of {LANES}"
    if kernel == "splash":
        bq, bkv = block_sizes(cfg, seq_len)
        return "splash", f"auto on tpu, blocks q {bq} / kv {bkv}"
    return "cudnn", "auto on gpu"


def call_impl(cfg: ModelConfig, seq_len: int, self_attention: bool, dense_mask: bool) -> str:
    """The implementation of one model call: "xla" unless its attention is over its own
    `seq_len` tokens (`self_attention`) with no mask term a kernel lacks (`dense_mask`)."""
    if cfg.attention_impl == "xla" or not self_attention or dense_mask:
        return "xla"
    return describe(cfg, seq_len)[0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_sizes(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(block_q, block_kv) for splash over `seq_len` tokens: the config's, else the largest of
    512 / 256 / 128 dividing the sequence rounded up to 128, capped at 256 when head_dim > 128
    (a bigger head makes each tile's q, k, v and float32 scores heavier in VMEM). Neither is
    larger than that rounded sequence."""
    padded = _round_up(seq_len, LANES)
    cap = 256 if cfg.head_dim > 128 else 512
    default = next(b for b in (512, 256, 128) if b <= cap and padded % b == 0)
    bq = min(cfg.attention_block_q or default, padded)
    bkv = min(cfg.attention_block_kv or default, padded)
    return bq, bkv


def check_blocks(cfg: ModelConfig, seq_len: int) -> None:
    """Refuse configured splash tiles that do not divide a training sequence of `seq_len`."""
    for name in ("attention_block_q", "attention_block_kv"):
        value = getattr(cfg, name)
        if value is not None and cfg.attention_impl in ("splash", "auto") and seq_len % value:
            raise ValueError(
                f"model.{name}={value} does not divide the sequence length {seq_len} "
                f"(data.seq_len); valid: multiples of 128 dividing it, e.g. "
                f"{[b for b in (128, 256, 512, 1024) if seq_len % b == 0] or 'none: use 128s'}"
            )


def window_sizes(cfg: ModelConfig) -> tuple[int, int] | None:
    """The sliding window as (keys before, keys after) each query that it sees: key s is
    visible from query t when t - s < W (and s - t < W when bidirectional)."""
    if cfg.sliding_window is None:
        return None
    w = cfg.sliding_window - 1
    return (w, 0 if cfg.causal else w)


def _splash_kernel(
    heads: int,
    seq_len: int,
    causal: bool,
    window: tuple[int, int] | None,
    cap: float | None,
    bq: int,
    bkv: int,
    interpret: bool,
):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    if window is not None:
        one = sa.LocalMask(shape, window, 0)
    else:
        one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    blocks = dict(block_q=bq, block_kv=bkv, block_kv_compute=bkv)
    blocks |= dict(block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv)
    blocks |= dict(block_q_dq=bq, block_kv_dq=bkv)
    # Built per trace (its tables become constants of that trace); the splash library caches
    # the expensive part, the block tables of a mask.
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * heads),
        block_sizes=sa.BlockSizes(**blocks),
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=cap,
        interpret=interpret,
    )


def _splash(
    q_BNTH: jax.Array,
    k_BKTH: jax.Array,
    v_BKTH: jax.Array,
    ids_BT: jax.Array | None,
    cfg: ModelConfig,
    bq: int,
    bkv: int,
    interpret: bool,
) -> jax.Array:
    """The kernel on one shard's examples and heads (T a multiple of both tiles)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    heads, t = q_BNTH.shape[1], q_BNTH.shape[2]
    kernel = _splash_kernel(
        heads, t, cfg.causal, window_sizes(cfg), cfg.attn_logit_softcap, bq, bkv, interpret
    )
    if ids_BT is None:
        return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    segments = sa.SegmentIds(ids_BT, ids_BT)
    return jax.vmap(kernel, in_axes=(0, 0, 0, sa.SegmentIds(0, 0)))(
        q_BNTH, k_BKTH, v_BKTH, segments
    )


def splash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    ids_BT: jax.Array | None,
    cfg: ModelConfig,
) -> jax.Array:
    """[B, T, N, H] outputs of splash attention (queries already scaled). A sequence that is
    not a multiple of the tiles is padded with positions of a segment of their own."""
    b, t, n, _ = q_BTNH.shape
    bq, bkv = block_sizes(cfg, t)
    padded = _round_up(t, math.lcm(bq, bkv))
    if padded != t:
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BTKH, v_BTKH))
        ids_BT = jnp.ones((b, t), jnp.int32) if ids_BT is None else ids_BT
        ids_BT = jnp.pad(ids_BT, ((0, 0), (0, padded - t)), constant_values=_PAD_SEGMENT)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BTKH, v_BTKH))  # [B, heads, T, H]
    run = functools.partial(
        _splash, cfg=cfg, bq=bq, bkv=bkv, interpret=sharding.platform() != "tpu"
    )
    ctx = sharding.current()
    if ctx is None:
        out = run(q, k, v, ids_BT)
    else:
        mesh, rules = ctx
        q_spec = sharding.logical_to_spec(
            ("act_batch", "act_heads", None, None), q.shape, mesh, rules
        )
        kv_spec = sharding.logical_to_spec(
            ("act_batch", "act_kv_heads", None, None), k.shape, mesh, rules
        )
        if kv_spec[1] != q_spec[1]:
            # The kv heads split differently from the query heads (fewer kv heads than the
            # tensor axis): give every query head its own copy, split like the queries.
            k, v = (jnp.repeat(x, n // k.shape[1], axis=1) for x in (k, v))
            kv_spec = q_spec
        ids_spec = PartitionSpec(q_spec[0], None)
        out = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, None if ids_BT is None else ids_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, ids_BT)
    return jnp.swapaxes(out, 1, 2)[:, :t]


def cudnn_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    ids_BT: jax.Array | None,
    cfg: ModelConfig,
    implementation: str = "cudnn",
) -> jax.Array:
    """[B, T, N, H] outputs of `jax.nn.dot_product_attention` (queries already scaled): causal
    and left windows as cuDNN's mask types, packed segments as a [B, 1, T, T] mask.
    `implementation="xla"` runs the same call through XLA (how CPU checks the arguments)."""
    mask = None
    if ids_BT is not None:
        mask = (ids_BT[:, :, None] == ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        mask=mask,
        scale=1.0,
        is_causal=cfg.causal,
        local_window_size=window_sizes(cfg),
        implementation=implementation,
    )


def fused_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    ids_BT: jax.Array | None,
    cfg: ModelConfig,
) -> jax.Array:
    """Self-attention of the call's own tokens with the kernel `describe` picks."""
    impl = describe(cfg, q_BTNH.shape[1])[0]
    if impl == "splash":
        return splash_attention(q_BTNH, k_BTKH, v_BTKH, ids_BT, cfg)
    if impl == "cudnn":
        return cudnn_attention(q_BTNH, k_BTKH, v_BTKH, ids_BT, cfg)
    raise AssertionError(f"fused_attention called for {impl!r}")


__all__ = [
    "Segments",
    "block_sizes",
    "call_impl",
    "check_blocks",
    "cudnn_attention",
    "describe",
    "fused_attention",
    "splash_attention",
    "window_sizes",
]
