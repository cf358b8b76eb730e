"""Masked-LM corruption against its definition: chi-square on the rate and the 80/10/10 split,
special tokens never chosen, whole words chosen together."""

import numpy as np
from scipy import stats

from jaxlm.data import ByteTokenizer, token_bytes
from jaxlm.data.masking import Masking


def _masking(**kw):
    tok = ByteTokenizer()
    return tok, Masking.make(tok, 320, token_bytes(tok), **kw)


def test_rate_and_split_pass_chi_square_and_specials_are_never_chosen():
    tok, m = _masking()
    rng = np.random.default_rng(0)
    chosen = 0
    counts, total = np.zeros(3), 0
    for _ in range(200):
        tokens = rng.integers(3, 259, 256)
        tokens[::17] = tok.bos_id
        segments = np.ones(256, int)
        segments[-20:] = 0
        out = m.corrupt(tokens, segments, rng)
        assert not out["mask"][tokens == tok.bos_id].any() and not out["mask"][-20:].any()
        c = out["mask"]
        total += int(((tokens != tok.bos_id) & (segments != 0)).sum())
        chosen += int(c.sum())
        got, orig = out["tokens"][c], out["targets"][c]
        assert (orig == tokens[c]).all()
        counts += [
            (got == m.mask_id).sum(),
            ((got != m.mask_id) & (got != orig)).sum(),
            (got == orig).sum(),
        ]
    assert stats.chisquare([chosen, total - chosen], [0.15 * total, 0.85 * total]).pvalue > 1e-3
    r = 1 / len(m.replacements)  # a random replacement may draw the original token
    expected = np.array([0.8, 0.1 * (1 - r), 0.1 + 0.1 * r]) * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # A wrong split (0.8 / 0.2 / 0) would be far outside.
    assert stats.chisquare(counts, np.array([0.8, 0.2, 1e-9]) * counts.sum()).pvalue < 1e-6


def test_whole_word_masking_chooses_whole_words():
    tok, m = _masking(whole_word=True, mask_prob=0.3)
    text = "def fill_mask(self, text): return self.model(text) + 42 " * 20
    tokens = np.asarray(tok.encode(text))
    words = m.word_ids(tokens, np.ones(len(tokens), bool))
    rng = np.random.default_rng(1)
    out = m.corrupt(tokens, np.ones(len(tokens), int), rng)
    for w in np.unique(words):
        picked = out["mask"][words == w]
        assert picked.all() or not picked.any()
    assert len(np.unique(words[tokens == ord("f") + 3])) > 1  # "fill_mask" is one word of many
    first = np.flatnonzero(tokens == ord("(") + 3)[0]
    assert words[first] != words[first - 1]  # punctuation splits words


def test_masked_batches_resume_with_the_same_masks_and_depend_on_the_seed():
    """A stream of masked batches restored from its saved state (through JSON) continues with
    the same corruption; the masks differ from batch to batch and from seed to seed."""
    import json

    from jaxlm.data import DataIterator, build_dataset
    from jaxlm.data.masking import MaskedRows

    tok, m = _masking()
    docs = [f"def f{i}(x):\n    return x * {i}\n" * (i % 7 + 1) for i in range(80)]

    def fresh(seed=3):
        ds = build_dataset(docs, tok, seq_len=64, batch_size=4, seed=seed, rows=MaskedRows(m))
        return DataIterator(ds)

    uninterrupted = fresh()
    expected = [next(uninterrupted) for _ in range(10)]
    it = fresh()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = fresh()
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    masks = np.stack([b["mask"] for b in expected])
    assert 0.1 < masks.mean() < 0.2 and len({m.tobytes() for m in masks}) == len(masks)
    assert not np.array_equal(next(fresh(seed=4))["mask"], expected[0]["mask"])
