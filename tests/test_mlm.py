"""Masked-LM pre-training (task.kind=mlm): the loss against NumPy on the chosen positions only,
and a tiny BERT that learns to fill masks that only the context after them can answer."""

import dataclasses
import json
import random

import numpy as np
import pytest

from jaxlm import cli, loop
from jaxlm.configs.overrides import load_config
from jaxlm.configs.presets import get_preset
from jaxlm.data import ByteTokenizer, token_bytes
from jaxlm.data.masking import Masking
from jaxlm.encode import fill_mask
from jaxlm.run import RunPlan, load_for_eval
from jaxlm.sharding import use_mesh
from jaxlm.tasks import get_task
from tests import numpy_reference
from tests.random_params import random_params

LETTERS = "abcdefgh"


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_is_the_cross_entropy_of_the_chosen_positions_only():
    """The task's summed loss, count and correct predictions equal the NumPy float64 forward's,
    taken over the chosen positions alone (packed rows with padding)."""
    model = dataclasses.replace(get_preset("tiny-bert"), scan_layers=False, max_seq_len=32)
    config = load_config("tiny-bert", ["task.kind=mlm", "data.seq_len=32"])
    config = dataclasses.replace(config, model=model)
    tok = ByteTokenizer()
    masking = Masking.make(tok, model.vocab_size, token_bytes(tok), mask_prob=0.3)
    rng = np.random.default_rng(0)
    rows = []
    for r in range(3):
        tokens = rng.integers(3, 259, 32)
        segments = np.repeat([1, 2, 0], [12 + r, 14, 6 - r])  # two documents and padding
        rows.append(masking.corrupt(tokens, segments, rng))
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    params = random_params(model, seed=1)
    task = get_task(config)
    terms = task.token_sums(params, batch)

    logits = numpy_reference.forward(
        params, batch["tokens"], model, batch["segment_ids"], batch["positions"]
    )
    logp = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    chosen = batch["mask"]
    assert 10 < chosen.sum() < chosen.size // 2  # some, not all, positions count
    np.testing.assert_allclose(float(terms["nll"]), -logp[chosen].sum(), rtol=2e-5)
    assert float(terms["count"]) == chosen.sum()
    hits = (logits.argmax(-1) == batch["targets"]) & chosen
    assert float(terms["correct"]) == hits.sum()
    # Over every position the sum would differ: only the chosen ones count.
    assert abs(-logp.sum() - float(terms["nll"])) > 1.0


@pytest.mark.parametrize("whole_word", [False, True])
def test_max_predictions_caps_the_chosen_tokens_and_scores_only_them(whole_word):
    """With task.max_predictions K a row has at most K chosen tokens (whole words kept whole),
    listed for the head, and the loss over those K equals the head over every position."""
    model = dataclasses.replace(get_preset("tiny-bert"), max_seq_len=64)
    overrides = ["task.kind=mlm", "data.seq_len=64", "task.max_predictions=6"]
    overrides += ["task.mask_prob=0.3"] + ["task.whole_word_masking=true"] * whole_word
    config = dataclasses.replace(load_config("tiny-bert", overrides), model=model)
    task = get_task(config)
    masking = task.masking(ByteTokenizer())
    rng = np.random.default_rng(0)
    text = np.asarray(ByteTokenizer().encode("def f(x, y):\n    return x + y  # add\n" * 2))
    rows = [masking.corrupt(text[:64], np.ones(64, int), rng) for _ in range(4)]
    batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    counts = batch["mask"].sum(1)
    assert counts.max() <= 6 and counts.min() >= 1
    np.testing.assert_array_equal(batch["predict_valid"].sum(1), counts)
    for row in rows:  # the listed positions are exactly the chosen ones
        np.testing.assert_array_equal(
            row["predict_positions"][row["predict_valid"]], np.flatnonzero(row["mask"])
        )
        if whole_word:
            words = masking.word_ids(text[:64], np.ones(64, bool))
            for w in set(words[row["mask"]]):
                assert row["mask"][words == w].all()
    params = random_params(model, seed=3)
    gathered = task.token_sums(params, batch)
    full = task.token_sums(params, {k: v for k, v in batch.items() if "predict" not in k})
    for key in ("nll", "count", "correct"):
        np.testing.assert_allclose(float(gathered[key]), float(full[key]), rtol=1e-5)


def _words(n, seed):
    r = random.Random(seed)
    return ["".join(r.choice(LETTERS) for _ in range(5)) for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-bert trained with task.kind=mlm on documents "w w" (a five-letter word twice);
    with rotary positions it learns to read the other copy in 250 steps (BERT's learned
    positions take about 600)."""
    root = tmp_path_factory.mktemp("mlm")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {w}"}) + "\n" for w in _words(4000, 0)))
    config = load_config(
        "tiny-bert",
        [
            f"data.dataset={data}",
            "task.kind=mlm",
            "data.seq_len=64",
            "data.batch_size=32",
            "train.steps=250",
            "model.position=rope",
            "train.eval_every=100000",
            "train.eval_batches=4",
            "train.sample_tokens=0",
            "train.log_every=200",
            "optim.warmup_steps=20",
            "checkpoint.every=100000",
        ],
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLM_CACHE", str(root / "cache"))
    loop.train(config, root / "run")
    yield root / "run"
    mp.undo()


def _fill_accuracy(workdir, texts, answers):
    config, mesh, params, tok = load_for_eval(workdir)
    with use_mesh(mesh, config.mesh.rules):
        out = fill_mask(config.model, params, tok, texts, top_k=1)
    return np.mean([o.fillers[0][0].text == a for o, a in zip(out, answers, strict=True)])


def test_a_tiny_bert_learns_to_fill_masks_from_the_right_context(trained):
    """A letter of the first copy can only be known from the second (chance: 1/8); the trained
    encoder fills it almost always, on held-out words, and the held-out masked accuracy is high."""
    workdir = trained
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert evals and evals[-1]["eval_accuracy"] > 0.7, evals
    words = _words(200, 1)
    first = [w[: k % 5] + "[MASK]" + w[k % 5 + 1 :] + " " + w for k, w in enumerate(words)]
    answers = [w[k % 5] for k, w in enumerate(words)]
    assert _fill_accuracy(workdir, first, answers) >= 0.9
    # Two masks at once, one in each copy at different letters, are both filled.
    words = words[:50]
    both = [f"{w[:1]}[MASK]{w[2:]} {w[:3]}[MASK]{w[4:]}" for w in words]
    config, mesh, params, tok = load_for_eval(workdir)
    with use_mesh(mesh, config.mesh.rules):
        out = fill_mask(config.model, params, tok, both, top_k=3)
    right = [
        [m[0].text for m in o.fillers] == [w[1], w[3]] for o, w in zip(out, words, strict=True)
    ]
    assert np.mean(right) >= 0.8
    assert all(o.filled == w + " " + w for o, w, r in zip(out, words, right, strict=True) if r)


def test_fill_mask_on_the_command_line(trained, capsys):
    workdir = trained
    rc = cli.main(["sample", "--workdir", str(workdir), "--fill-mask", "abc[MASK]e abcde"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["filled"] == "abcde abcde"
    probs = [c["prob"] for c in line["masks"][0]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert line["masks"][0][0]["token"] == "d"


def test_mlm_on_the_default_corpus_beats_the_most_common_byte(tmp_path, stdlib_cache):
    """400 steps of tiny-bert (rotary positions) on the standard-library corpus: held-out
    masked-token accuracy well above always guessing the held-out targets' most common byte."""
    config = load_config(
        "tiny-bert",
        [
            "task.kind=mlm",
            "model.position=rope",
            "train.steps=400",
            "train.eval_every=100000",
            "train.eval_batches=8",
            "train.sample_tokens=0",
            "train.log_every=200",
            "checkpoint.every=100000",
        ],
    )
    loop.train(config, tmp_path / "run")
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "eval_accuracy" in m][-1]
    plan = RunPlan(config)
    it = plan.task.make_iterator(plan.tokenizer, split=config.data.eval_split, num_epochs=1)
    batches = [next(it) for _ in range(8)]  # 8 held-out batches, masked as in evaluation
    targets = np.concatenate([b["targets"][b["mask"]] for b in batches])
    majority = np.bincount(targets).max() / len(targets)
    assert majority < 0.35 and final["eval_accuracy"] > majority + 0.1, (majority, final)
