"""Model size and cost from the config alone: parameter counts, FLOPs per token, memory."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlm.configs.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts; `embedding` is the token and position tables plus an untied output."""

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_count(config: ModelConfig) -> ParamCount:
    """Exact parameter count of `Transformer(config)`, computed from the shapes alone."""
    c = config
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    norm = d * (2 if c.norm_bias else 1)
    attn = d * n * h + 2 * d * k * h + n * h * d
    if c.attn_bias:
        attn += n * h + 2 * k * h + d
    if c.qk_norm:
        attn += 2 * h * (2 if c.norm_bias else 1)
    mlp = (3 if c.gated else 2) * d * f
    if c.mlp_bias:
        mlp += (2 if c.gated else 1) * f + d
    per_layer = 2 * norm + attn + mlp
    embedding = c.vocab_size * d
    if c.position == "learned":
        embedding += c.max_seq_len * d
    if not c.tie_embeddings:
        embedding += d * c.vocab_size
    return ParamCount(total=c.num_layers * per_layer + norm + embedding, embedding=embedding)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    6 * (matmul parameters) + 12 * L * N * H * T, as in PaLM's MFU accounting: 2 FLOPs per
    multiply-add, times 3 for forward + backward. Matmul parameters are every weight used in a
    matrix product, i.e. all non-embedding weights plus the output projection (the tied or
    untied [D, V] logits matmul); embedding lookups and norms/biases cost no matmul FLOPs. The
    attention term counts the full T x T score and value products, as XLA computes them (no
    causal halving, and a sliding window still computes every score before masking).
    """
    c = config
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
    matmul_per_layer = d * n * h + 2 * d * k * h + n * h * d + (3 if c.gated else 2) * d * f
    matmul = c.num_layers * matmul_per_layer + d * c.vocab_size
    attention = 2 * c.num_layers * n * h * seq_len
    return float(6 * matmul + 6 * attention)


def training_state_bytes(config: ModelConfig, optimizer_copies: int = 2) -> dict[str, int]:
    """Bytes of parameters (in `param_dtype`) and of an Adam-style state (f32 moments)."""
    params = param_count(config).total
    return {
        "params": params * jnp.dtype(config.param_dtype).itemsize,
        "optimizer": params * 4 * optimizer_copies,
    }
