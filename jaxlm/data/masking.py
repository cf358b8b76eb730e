"""Masked-LM corruption of packed rows (BERT): choose tokens, replace them, keep the originals.

Each non-special token of a row is chosen with probability `mask_prob` (or, with whole-word
masking, each word is, and then all of its tokens); of the chosen tokens a fraction
`mask_token_frac` becomes the mask token, `random_token_frac` a uniformly random non-special
token, and the rest stay as they were. The loss is on the chosen tokens only. Special tokens
(padding, bos/[CLS], eos/[SEP], the mask token itself) are never chosen. With
`max_predictions` K, a row keeps at most K chosen tokens (whole words, in a random order, while
they fit), listed in `predict_positions` / `predict_valid` for a head that scores only them.

The corruption runs in the Grain pipeline as a random map: its generator is seeded by the
stream's seed and the row's index, which the iterator state saves, so a resumed run sees the
same masks an uninterrupted one would, and each epoch masks a row afresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxlm.data.pipeline import segment_positions
from jaxlm.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer


def mask_id_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's mask token id, or -1 when it has none."""
    value = getattr(tokenizer, "mask_id", -1)
    return -1 if value is None else int(value)


def special_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Sorted ids never chosen or drawn as random replacements: pad, bos, eos, mask, and a
    Hugging Face tokenizer's other added special tokens ([UNK], [CLS], ...)."""
    ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, mask_id_of(tokenizer)}
    if isinstance(tokenizer, HFTokenizer):
        decoder = tokenizer._tok.get_added_tokens_decoder()
        ids |= {i for i, t in decoder.items() if t.special}
    if isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer._sp
        ids |= {i for i in range(tokenizer.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
    return np.asarray(sorted(i for i in ids if i >= 0), np.int64)


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_" or ord(c) >= 0x80


def word_tables(tokenizer: Tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(lead [V], tail [V], wordpiece): whether each token's text starts / ends inside a word
    (a letter, digit, "_" or non-ASCII character, no leading space), and whether the
    tokenizer marks continuations itself (WordPiece "##"; then `lead` is "starts with ##").

    Token t continues the word of the token s before it when tail[s] and lead[t] (WordPiece:
    when lead[t]), so words are found the same way for bytes, BPE and SentencePiece pieces.
    """
    lead, tail = np.zeros(vocab_size, bool), np.zeros(vocab_size, bool)
    n = min(vocab_size, tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        for i in range(tokenizer.offset, n):
            ch = chr(i - tokenizer.offset)
            lead[i] = tail[i] = i - tokenizer.offset >= 0x80 or _is_word_char(ch)
        return lead, tail, False
    wordpiece = False
    if isinstance(tokenizer, HFTokenizer):
        wordpiece = "WordPiece" in type(tokenizer._tok.model).__name__
    for i in range(n):
        if isinstance(tokenizer, SentencePieceTokenizer):
            text = tokenizer._sp.id_to_piece(i).replace("\u2581", " ")
        elif isinstance(tokenizer, HFTokenizer):
            token = tokenizer._tok.id_to_token(i) or ""
            if wordpiece:
                lead[i] = token.startswith("##")
                continue
            text = tokenizer._tok.decode([i], skip_special_tokens=False)
        else:
            text = tokenizer.decode([i])
        if text:
            lead[i], tail[i] = _is_word_char(text[0]), _is_word_char(text[-1])
    return lead, tail, wordpiece


@dataclasses.dataclass(frozen=True)
class Masking:
    """The corruption's settings and the tokenizer's tables (see the module docstring)."""

    mask_id: int
    pad_id: int
    special: np.ndarray  # sorted ids never chosen
    replacements: np.ndarray  # the ids a random replacement is drawn from
    token_bytes: np.ndarray  # [V] bytes per id (bits per byte of the targets)
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    whole_word: bool = False
    lead: np.ndarray | None = None
    tail: np.ndarray | None = None
    wordpiece: bool = False
    # At most this many chosen tokens per row (BERT's max_predictions_per_seq), listed in
    # `predict_positions` so the model scores only them; None = no cap, no list.
    max_predictions: int | None = None

    @classmethod
    def make(
        cls,
        tokenizer: Tokenizer,
        vocab_size: int,
        token_bytes: np.ndarray,
        *,
        mask_prob: float = 0.15,
        mask_token_frac: float = 0.8,
        random_token_frac: float = 0.1,
        whole_word: bool = False,
        max_predictions: int | None = None,
    ) -> Masking:
        mask_id = mask_id_of(tokenizer)
        if mask_id < 0:
            raise ValueError(
                f"masked LM needs a mask token, and this tokenizer ({type(tokenizer).__name__}) "
                "has none; use a tokenizer with [MASK] or <mask> (the byte tokenizer has one)"
            )
        if mask_id >= vocab_size:
            raise ValueError(
                f"the mask token id {mask_id} does not fit model.vocab_size={vocab_size}; set "
                f"model.vocab_size >= {mask_id + 1}"
            )
        special = special_ids(tokenizer)
        ids = np.arange(min(tokenizer.vocab_size, vocab_size))
        replacements = ids[~np.isin(ids, special)]
        lead = tail = None
        wordpiece = False
        if whole_word:
            lead, tail, wordpiece = word_tables(tokenizer, vocab_size)
        return cls(
            mask_id=mask_id,
            pad_id=tokenizer.pad_id,
            special=special,
            replacements=replacements,
            token_bytes=token_bytes,
            mask_prob=mask_prob,
            mask_token_frac=mask_token_frac,
            random_token_frac=random_token_frac,
            whole_word=whole_word,
            max_predictions=max_predictions,
            lead=lead,
            tail=tail,
            wordpiece=wordpiece,
        )

    def word_ids(self, tokens: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """[T] the index of each token's word (whole-word masking): a candidate token
        continues the word before it when the tokenizer's tables say it joins it."""
        joins = np.zeros(tokens.shape, bool)
        if self.wordpiece:
            joins[1:] = self.lead[tokens[1:]]
        else:
            joins[1:] = self.tail[tokens[:-1]] & self.lead[tokens[1:]]
        joins[1:] &= candidates[1:] & candidates[:-1]
        return np.cumsum(~joins) - 1

    def corrupt(
        self, tokens: np.ndarray, segments: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Any]:
        """One packed row as the batch keys: `tokens` corrupted, `targets` the originals at
        the chosen positions (pad elsewhere), `mask` the chosen positions."""
        tokens, segments = tokens.astype(np.int32), segments.astype(np.int32)
        tokens = np.where(segments != 0, tokens, self.pad_id).astype(np.int32)
        candidates = (segments != 0) & ~np.isin(tokens, self.special)
        words = self.word_ids(tokens, candidates) if self.whole_word else np.arange(len(tokens))
        chosen = candidates & (rng.random(int(words[-1]) + 1) < self.mask_prob)[words]
        if self.max_predictions is not None and chosen.sum() > self.max_predictions:
            chosen = self._cap(chosen, words, rng)
        action = rng.random(tokens.shape)
        to_mask = chosen & (action < self.mask_token_frac)
        to_random = (
            chosen
            & (action >= self.mask_token_frac)
            & (action < self.mask_token_frac + self.random_token_frac)
        )
        random_ids = self.replacements[rng.integers(0, len(self.replacements), tokens.shape)]
        inputs = np.where(to_mask, self.mask_id, np.where(to_random, random_ids, tokens))
        targets = np.where(chosen, tokens, self.pad_id).astype(np.int32)
        extra = {}
        if self.max_predictions is not None:
            at = np.flatnonzero(chosen)
            positions = np.zeros(self.max_predictions, np.int32)
            positions[: len(at)] = at
            extra = {
                "predict_positions": positions,
                "predict_valid": np.arange(self.max_predictions) < len(at),
            }
        return {
            **extra,
            "tokens": inputs.astype(np.int32),
            "targets": targets,
            "mask": chosen,
            "segment_ids": segments,
            "positions": segment_positions(segments),
            "target_bytes": np.int32(self.token_bytes[targets][chosen].sum()),
        }

    def _cap(self, chosen: np.ndarray, words: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The chosen words kept in a random order while their tokens fit max_predictions."""
        picked = np.unique(words[chosen])
        rng.shuffle(picked)
        sizes = np.bincount(words[chosen], minlength=int(words[-1]) + 1)[picked]
        keep = picked[np.cumsum(sizes) <= self.max_predictions]
        return chosen & np.isin(words, keep)


@dataclasses.dataclass(frozen=True)
class MaskedRows(grain.transforms.RandomMap):
    """The pipeline's step from packed rows to masked-LM batch rows."""

    masking: Masking

    def random_map(self, packed: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        return self.masking.corrupt(packed["tokens"], packed["tokens_segment_ids"], rng)
