"""Prefix LM (task.kind=prefix_lm): the split points against their distribution, the loss on
the rest only against the NumPy float64 forward, resumable batches, and bad configs."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

from jaxlm.configs.overrides import load_config
from jaxlm.configs.presets import get_preset
from jaxlm.data import ByteTokenizer, DataIterator, build_dataset, token_bytes
from jaxlm.run import RunPlan
from jaxlm.tasks import get_task
from jaxlm.tasks.prefix_lm import PrefixRows, split_prefixes
from tests import numpy_reference
from tests.random_params import random_params

TOK = ByteTokenizer()


def test_each_segment_gets_a_prefix_of_uniform_length_and_padding_none():
    segments = np.repeat([1, 2, 3, 0], [6, 1, 9, 4])
    rng = np.random.default_rng(0)
    lengths = {1: [], 3: []}
    for _ in range(2000):
        prefix = split_prefixes(segments, rng)
        assert not prefix[segments == 0].any()
        assert prefix[6]  # a one-token segment is all prefix (nothing to predict)
        for seg in lengths:
            row = prefix[segments == seg]
            k = int(row.sum())
            assert row[:k].all() and not row[k:].any()  # a block at the segment's start
            lengths[seg].append(k)
    for seg, size in ((1, 6), (3, 9)):
        counts = np.bincount(lengths[seg], minlength=size)[1:size]
        assert len(counts) == size - 1 and stats.chisquare(counts).pvalue > 1e-3
        assert min(lengths[seg]) == 1 and max(lengths[seg]) == size - 1


def test_the_loss_is_the_next_token_cross_entropy_after_the_prefix_only():
    model = dataclasses.replace(
        get_preset("tiny"), prefix_lm=True, scan_layers=False, max_seq_len=32
    )
    config = load_config("tiny", ["task.kind=prefix_lm", "model.prefix_lm=true"])
    config = dataclasses.replace(config, model=model)
    rows_fn = PrefixRows(TOK.pad_id, token_bytes(TOK))
    rng = np.random.default_rng(0)
    rows = []
    for r in range(3):
        segments = np.repeat([1, 2, 0], [13 + r, 15, 4 - r])
        packed = {"tokens": rng.integers(3, 259, 32), "tokens_segment_ids": segments}
        rows.append(rows_fn.random_map(packed, rng))
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    params = random_params(model, seed=2)
    terms = get_task(config).token_sums(params, batch)

    tokens, seg, prefix = batch["tokens"], batch["segment_ids"], batch["prefix"]
    logits = numpy_reference.forward(params, tokens, model, seg, prefix_BT=prefix)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = count = 0.0
    for b in range(3):
        for t in range(31):
            # The target (t + 1) is in the same document and after the prefix.
            if seg[b, t] != 0 and seg[b, t + 1] == seg[b, t] and not prefix[b, t + 1]:
                nll -= logp[b, t, tokens[b, t + 1]]
                count += 1
    assert 20 < count < 75
    assert float(terms["count"]) == count
    np.testing.assert_allclose(float(terms["nll"]), nll, rtol=2e-5)


def test_prefix_batches_resume_exactly():
    docs = [f"def f{i}(x):\n    return x * {i}\n" * (i % 5 + 1) for i in range(60)]

    def fresh():
        rows = PrefixRows(TOK.pad_id, token_bytes(TOK))
        return DataIterator(build_dataset(docs, TOK, seq_len=64, batch_size=4, seed=2, rows=rows))

    expected = [next(it) for it in [fresh()] for _ in range(8)]
    it = fresh()
    for _ in range(3):
        next(it)
    resumed = fresh()
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for want in expected[3:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert 0 < np.mean([b["prefix"].mean() for b in expected]) < 0.9


def test_prefix_lm_task_needs_a_prefix_lm_model():
    config = load_config("tiny", ["task.kind=prefix_lm"])
    with pytest.raises(ValueError, match=r"set model\.prefix_lm=true"):
        RunPlan(config, tokenizer=TOK)


def test_a_prefix_lm_learns_to_continue_after_its_prefix(tmp_path, monkeypatch, capsys):
    """Trained on documents "w w" (a five-letter word twice), a prefix LM reads "w " as its
    prefix and writes w: held-out exact match >= 90% (chance 8^-5), by `generate` and by
    `jaxlm sample`."""
    import random

    from jaxlm import cli, loop, sample
    from jaxlm.run import load_for_eval
    from jaxlm.sharding import use_mesh

    r = random.Random(0)
    words = ["".join(r.choice("abcdefgh") for _ in range(5)) for _ in range(4100)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {w}"}) + "\n" for w in words[100:]))
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    overrides = [
        f"data.dataset={data}",
        "task.kind=prefix_lm",
        "model.prefix_lm=true",
        "data.seq_len=64",
        "data.batch_size=32",
        "train.steps=200",
        "train.eval_every=100000",
        "train.eval_batches=2",
        "train.sample_tokens=0",
        "train.log_every=100",
        "optim.warmup_steps=20",
        "checkpoint.every=100000",
    ]
    loop.train(load_config("tiny-llama", overrides), tmp_path / "run")
    config, mesh, params, tok = load_for_eval(tmp_path / "run")
    held_out = words[:100]
    prompts = [[tok.bos_id, *tok.encode(w + " ")] for w in held_out]
    with use_mesh(mesh, config.mesh.rules):
        out = sample.generate(config.model, params, prompts, 6, stop_tokens=[tok.eos_id])
    assert np.mean([tok.decode(o) == w for o, w in zip(out, held_out, strict=True)]) >= 0.9
    argv = ["sample", "--workdir", tmp_path / "run", "--prompt", f"{held_out[0]} "]
    assert cli.main([str(a) for a in [*argv, "--temperature", "0", "--max-new-tokens", "8"]]) == 0
    assert capsys.readouterr().out.strip() == f"{held_out[0]} {held_out[0]}"


def test_sft_on_a_prefix_lm_trains_with_the_prompt_as_its_prefix(tmp_path, monkeypatch):
    """task.kind=sft on a prefix-LM model: the batches carry the prompts as prefixes (read
    bidirectionally, as `sample --chat` prefills them) and the loss differs from reading them
    causally."""
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"copy {w}", "completion": w} for w in ("abc", "bcd", "cde", "def") * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        "tiny", [f"data.dataset={data}", "task.kind=sft", "model.prefix_lm=true", "data.seq_len=64"]
    )
    plan = RunPlan(config, tokenizer=TOK)
    assert "prefix" in plan.task.batch_spec()
    batch = next(plan.task.make_iterator(TOK))
    pre, mask = batch["prefix"], batch["mask"]
    # No target inside a prompt is trained on (the last prompt token predicts the reply).
    assert pre.any() and not (pre[:, :-1] & pre[:, 1:] & mask[:, :-1]).any()
    params = random_params(config.model, seed=0)
    with_prefix = float(plan.task.loss_terms(params, batch)["nll"])
    causal = {k: v for k, v in batch.items() if k != "prefix"}
    causal_model = dataclasses.replace(
        config, model=dataclasses.replace(config.model, prefix_lm=False)
    )
    without = float(get_task(causal_model).loss_terms(params, causal)["nll"])
    assert abs(with_prefix - without) > 1e-3
