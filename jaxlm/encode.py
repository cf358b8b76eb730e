"""Inference with encoders: `fill_mask` (the top-k fillers of each mask of a masked-LM model)
and `embed` (sentence embeddings of a contrastive run).

Texts are encoded as in training (`[CLS] text [SEP]` for BERT: the tokenizer's bos and eos when
`add_bos` / `add_eos`), padded to a length bucket so similar requests reuse one compilation, and
run through one bidirectional forward pass; padding is its own segment, so it changes nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.model import ModelConfig
from jaxlm.data.masking import mask_id_of
from jaxlm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from jaxlm.distributed import to_host
from jaxlm.model.transformer import Transformer
from jaxlm.sample import _check_params, bucket

# How a mask is written in text given to a tokenizer that has no string for its mask id.
BYTE_MASK_TOKEN = "[MASK]"


class Filler(NamedTuple):
    """One candidate for a mask: the token id, its text and the model's probability."""

    token_id: int
    text: str
    prob: float


class FilledText(NamedTuple):
    """`fill_mask`'s answer for one text: the candidates of each mask, most likely first, and
    the text with every mask replaced by its most likely token."""

    fillers: list[list[Filler]]
    filled: str


def mask_token(tokenizer: Tokenizer) -> str:
    """The string that writes the mask token in text ("[MASK]" for BERT, "<mask>" for RoBERTa,
    "[MASK]" for the byte tokenizer); an error when the tokenizer has none."""
    mask_id = mask_id_of(tokenizer)
    if mask_id < 0:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no mask token ([MASK], <mask>): "
            "masked-LM inference needs one"
        )
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer._tok.id_to_token(mask_id)
    return BYTE_MASK_TOKEN


def encode_masked(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with each occurrence of the mask string as the mask id; an error
    when there is none."""
    token = mask_token(tokenizer)
    count = text.count(token)
    if count == 0:
        raise ValueError(
            f"{text[:80]!r} has no mask token: write {token!r} where a token is to be filled"
        )
    mask_id = mask_id_of(tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        # The tokenizer's own handling of its special tokens (e.g. RoBERTa's <mask> takes the
        # space before it), as `transformers` encodes it.
        ids = list(tokenizer.encode_template(text).ids)
        if ids.count(mask_id) == count:
            return ids
    pieces = text.split(token)
    ids = tokenizer.encode(pieces[0])
    for piece in pieces[1:]:
        ids += [mask_id] + (tokenizer.encode(piece) if piece else [])
    return ids


def _padded(rows: list[list[int]], pad_id: int, limit: int, n: int) -> tuple[np.ndarray, ...]:
    """(tokens, segments) [n, bucket]: the rows right-padded (segment 0) to a length bucket."""
    t = bucket(max(map(len, rows)), limit)
    tokens = np.full((n, t), pad_id, np.int32)
    segments = np.zeros((n, t), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = ids
        segments[i, : len(ids)] = 1
    return tokens, segments


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode([token_id], errors="replace")
    return tokenizer.decode([token_id])


def _check_model(config: ModelConfig, what: str) -> None:
    if config.causal:
        raise ValueError(
            f"{what} needs a bidirectional masked-LM model, but model.causal=True: a causal model "
            "predicts the next token (use `jaxlm sample --prompt`); train an encoder with "
            "model.causal=False and task.kind=mlm, or import a BERT/RoBERTa masked-LM checkpoint"
        )
    if config.head not in ("mlm", "lm"):
        raise ValueError(f"{what} needs token logits, but model.head={config.head!r}")


@functools.partial(jax.jit, static_argnames=("config", "top_k"))
def _top_fillers(
    params: Any, tokens_BT: jax.Array, segments_BT: jax.Array, config: ModelConfig, top_k: int
) -> tuple[jax.Array, jax.Array]:
    logits_BTV, _, _ = Transformer(config).apply({"params": params}, tokens_BT, None, segments_BT)
    logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    values_BTK, ids_BTK = jax.lax.top_k(logprobs_BTV, top_k)
    return jnp.exp(values_BTK), ids_BTK


def fill_mask(
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    texts: str | Sequence[str],
    top_k: int = 5,
    add_bos: bool = True,
    add_eos: bool = True,
) -> FilledText | list[FilledText]:
    """The `top_k` most likely tokens (with probabilities) at each mask of each text.

    Write masks as the tokenizer's mask string (`mask_token(tokenizer)`, e.g. "[MASK]").
    `add_bos` / `add_eos` wrap each text as in training (the run's `data.add_bos` /
    `data.add_eos`). One text gives one `FilledText`, a list of texts a list of them.
    """
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    if not batch:
        raise ValueError("no texts given")
    _check_model(config, "fill_mask")
    if not (isinstance(top_k, int) and 1 <= top_k <= config.vocab_size):
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, {config.vocab_size}]")
    mask_id = mask_id_of(tokenizer)
    if mask_id >= config.vocab_size:
        raise ValueError(
            f"the mask token id {mask_id} is outside the model's vocabulary "
            f"(model.vocab_size={config.vocab_size})"
        )
    rows = []
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise ValueError(f"text {i} is {type(text).__name__}, not a string")
        ids = encode_masked(tokenizer, text)
        ids = [tokenizer.bos_id] * add_bos + ids + [tokenizer.eos_id] * add_eos
        if len(ids) > config.max_seq_len:
            raise ValueError(
                f"text {i} has {len(ids)} tokens, more than model.max_seq_len="
                f"{config.max_seq_len}; shorten it"
            )
        rows.append(ids)
    _check_params(config, params)
    tokens, segments = _padded(rows, tokenizer.pad_id, config.max_seq_len, len(rows))
    probs, top = _top_fillers(params, tokens, segments, config=config, top_k=top_k)
    probs, top = to_host(probs), to_host(top)
    out = []
    for i, ids in enumerate(rows):
        at = [j for j, x in enumerate(ids) if x == mask_id]
        fillers = [
            [
                Filler(int(top[i, j, k]), _token_text(tokenizer, int(top[i, j, k])), float(p))
                for k, p in enumerate(probs[i, j])
            ]
            for j in at
        ]
        filled = list(ids)
        for j, cands in zip(at, fillers, strict=True):
            filled[j] = cands[0].token_id
        out.append(FilledText(fillers, tokenizer.decode(filled)))
    return out[0] if single else out


@functools.partial(jax.jit, static_argnames=("config", "pooling"))
def _pooled(
    params: Any, tokens_BT: jax.Array, segments_BT: jax.Array, config: ModelConfig, pooling: str
) -> jax.Array:
    from jaxlm.tasks.contrastive import normalize, pool_segments

    hidden_BTD, _, _ = Transformer(config).apply(
        {"params": params}, tokens_BT, None, segments_BT, hidden=True
    )
    return normalize(pool_segments(hidden_BTD, segments_BT, pooling)[:, 1])


def embed(
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    pooling: str = "mean",
    add_bos: bool = True,
    add_eos: bool = True,
    batch_size: int = 64,
) -> np.ndarray:
    """[N, d_model] float32 unit-length embeddings of `texts`: the last hidden states of each
    text pooled as in training (`pooling`: "mean", "cls" or "last"; the run's task.pooling),
    so the dot product of two rows is their cosine similarity. Texts longer than the model's
    max_seq_len are cut (as in training, where each text gets at most half a row)."""
    from jaxlm.configs.run import POOLINGS

    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings (got one string)")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"text {i} is {text!r:.40}: expected a non-empty string")
        ids = [tokenizer.bos_id] * add_bos + tokenizer.encode(text) + [tokenizer.eos_id] * add_eos
        rows.append(ids[: config.max_seq_len])
    _check_params(config, params)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        tokens, segments = _padded(chunk, tokenizer.pad_id, config.max_seq_len, batch_size)
        vectors = _pooled(params, tokens, segments, config=config, pooling=pooling)
        out.append(to_host(vectors)[: len(chunk)])
    return np.concatenate(out)
