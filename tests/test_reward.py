"""Reward models: the score head, the Bradley-Terry loss on packed pairs against each sequence
scored alone and NumPy, starting from a language model's run, and learning a held-out
preference (>= 90% pairwise accuracy)."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli, loop
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer
from jaxlm.data.chat import builtin_template, encode_chat
from jaxlm.data.preference import build_preference_dataset
from jaxlm.metrics import param_count
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, check_init_source, load_for_eval, state_from_source
from jaxlm.sample import generate
from jaxlm.tasks import get_task, param_names

TOK = ByteTokenizer()


def _pairs(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6)))
        out.append({"prompt": word, "chosen": word.upper(), "rejected": word})
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(p) + "\n" for p in records))
    return path


def test_the_score_head_replaces_the_unembedding_and_is_counted():
    config = load_config("tiny", ["model.head=score", "model.tie_embeddings=false"]).model
    params = Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    names = param_names(params)
    assert "score/w" in names and not any(n.startswith("unembed") for n in names)
    assert param_count(config).total == sum(x.size for x in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="this model scores sequences"):
        generate(config, params, [[1, 2]], 4)


def test_the_pair_loss_equals_bradley_terry_on_each_sequence_scored_alone(tmp_path):
    config = load_config("tiny", ["model.head=score", "task.kind=reward", "model.max_seq_len=256"])
    model = Transformer(config.model)
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    records = [json.dumps(p) for p in _pairs(24, 3)]
    plain = builtin_template("plain", TOK)
    ds = build_preference_dataset(records, TOK, template=plain, seq_len=256, batch_size=4)
    batch = next(iter(ds))
    terms = get_task(config).pair_terms(params, {k: jnp.asarray(v) for k, v in batch.items()})
    score = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    want_loss, want_correct, n = 0.0, 0, 0
    seg = batch["segment_ids"]
    for b in range(seg.shape[0]):
        for k in range(int(seg[b].max()) // 2):
            rewards = []
            for s in (2 * k + 1, 2 * k + 2):
                at = np.flatnonzero(seg[b] == s)
                tokens = np.zeros((1, 256), np.int32)
                tokens[0, : len(at)] = batch["tokens"][b, at]
                rewards.append(float(score(params, tokens)[0, len(at) - 1, 0]))  # last token
            margin = rewards[0] - rewards[1]
            want_loss += np.logaddexp(0.0, -margin)  # -log sigmoid(margin)
            want_correct += margin > 0
            n += 1
    assert n > 4 and float(terms["pairs"]) == n
    np.testing.assert_allclose(float(terms["loss"]), want_loss, rtol=1e-4)
    assert float(terms["correct"]) == want_correct


def test_reward_needs_a_score_head(tmp_path):
    path = _write(tmp_path / "p.jsonl", _pairs(30, 0))
    with pytest.raises(ValueError, match=r"needs a score head: set model\.head=score"):
        RunPlan(load_config("tiny", ["task.kind=reward", f"data.dataset={path}"]))
    with pytest.raises(ValueError, match=r"task\.kind=dpo trains a language model"):
        RunPlan(
            load_config(
                "tiny",
                ["task.kind=dpo", "model.head=score", "model.lora.rank=4", f"data.dataset={path}"],
            )
        )


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A language model's run (2 steps on the pairs' text) to start reward models from."""
    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(" ".join(p["prompt"] for p in _pairs(200, i)))
    config = load_config(
        "tiny",
        [
            f"data.dataset={corpus}",
            "model.tie_embeddings=false",
            "data.seq_len=64",
            "data.batch_size=8",
            "train.steps=2",
            "train.sample_tokens=0",
            "train.eval_every=1000",
            "train.eval_batches=1",
        ],
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(root / "cache"))
        loop.train(config, root / "work")
    return root / "work"


def _reward_config(path, *extra):
    return load_config(
        "tiny",
        [
            "model.head=score",
            "model.tie_embeddings=false",
            "task.kind=reward",
            f"data.dataset={path}",
            "data.seq_len=128",
            "data.batch_size=16",
            "train.steps=60",
            "train.eval_every=60",
            "train.eval_batches=4",
            "train.log_every=20",
            "optim.learning_rate=3e-3",
            "optim.warmup_steps=5",
            "checkpoint.every=1000",
            *extra,
        ],
    )


def test_a_reward_model_starts_from_a_language_models_run(tmp_path, lm_run, monkeypatch):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path / "p.jsonl", _pairs(100, 0))
    plan = RunPlan(_reward_config(path))
    source = check_init_source(plan, lm_run)
    state = state_from_source(plan, source)
    _, _, lm, _ = load_for_eval(lm_run)
    assert "unembed" in lm  # left behind: the reward model's output is its score head
    np.testing.assert_array_equal(
        np.asarray(state.params["embed"]["embedding"]), np.asarray(lm["embed"]["embedding"])
    )
    assert "score" in state.params and "unembed" not in state.params


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, lm_run):
    """A reward model trained 60 steps from the language model's run."""
    root = tmp_path_factory.mktemp("reward")
    path = _write(root / "pairs.jsonl", _pairs(1200, 0))
    config = _reward_config(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(root / "cache"))
        result = loop.train(config, root / "work", init_from=lm_run)
        after = loop.evaluate(RunPlan(config), result["state"].params, max_batches=4)
    return root, result, after


def test_the_reward_model_learns_a_held_out_preference(reward_run):
    _, result, after = reward_run
    assert after["eval_pairs"] >= 40
    assert after["eval_accuracy"] >= 0.9 and after["eval_margin"] > 0, after
    logged = [h for h in result["history"] if "accuracy" in h]
    assert logged[-1]["rewards_chosen"] > logged[-1]["rewards_rejected"]


def test_jaxlm_score_rates_new_pairs_and_conversations(reward_run, capsys):
    root, _, _ = reward_run
    fresh = _pairs(40, 99)  # other words than the training pairs'
    singles = [{"prompt": "abc", "completion": "ABC"}, {"prompt": "abc", "completion": "abc"}]
    _write(root / "new.jsonl", fresh + singles)
    rc = cli.main(["score", "--workdir", str(root / "work"), "--input", str(root / "new.jsonl")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = [json.loads(x) for x in out.out.splitlines()]
    assert len(lines) == 42 and set(lines[0]) == {"chosen", "rejected", "margin"}
    accuracy = np.mean([x["chosen"] > x["rejected"] for x in lines[:40]])
    assert accuracy >= 0.9 and f"pairwise accuracy {accuracy:.4f} over 40 pair(s)" in out.err
    assert lines[40]["reward"] > lines[41]["reward"]
    # The same reward from the model by hand: the score at the last token of the rendered chat.
    config, _, params, tokenizer = load_for_eval(root / "work")
    chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "ABC"}]
    ids = encode_chat(chat, tokenizer, builtin_template("plain", tokenizer))[0]
    scores = Transformer(config.model).apply({"params": params}, jnp.asarray([ids]))[0]
    assert lines[40]["reward"] == pytest.approx(float(scores[0, -1, 0]), abs=1e-4)


def test_jaxlm_score_refuses_bad_input(capsys, reward_run, tmp_path):
    root, _, _ = reward_run
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    rc = cli.main(
        ["score", "--workdir", str(root / "work"), "--input", str(tmp_path / "bad.jsonl")]
    )
    assert (
        rc == 2 and "bad.jsonl:1: 'chosen' and 'rejected' are the same" in capsys.readouterr().err
    )
