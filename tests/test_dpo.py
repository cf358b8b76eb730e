"""DPO: preference records, the loss and its gradient against NumPy, packed sequence log-probs
against each sequence's own forward pass, and learning a held-out preference (>= 90%)."""

import dataclasses
import json
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import loop
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, to_global
from jaxlm.data.chat import builtin_template
from jaxlm.data.preference import build_preference_dataset, encode_pair, pair_conversations
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, load_for_eval
from jaxlm.tasks.dpo import dpo_losses
from jaxlm.tasks.pairs import pair_sums

TOK = ByteTokenizer()
PLAIN = builtin_template("plain", TOK)


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_the_loss_and_its_gradient_match_numpy(kind, eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = rng.normal(-20, 5, size=(4, 64))
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    if kind == "ipo":
        want = (h - 1 / (2 * beta)) ** 2
        dh = 2 * (h - 1 / (2 * beta))
    else:
        want = -(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)
        sig = 1 / (1 + np.exp(-beta * h))
        dh = -beta * ((1 - eps) * (1 - sig) - eps * sig)
    got = dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr)), beta, kind, eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, b: jnp.sum(dpo_losses(a, b, rc, rr, beta, kind, eps)), (0, 1))(
        jnp.asarray(pc), jnp.asarray(pr)
    )
    np.testing.assert_allclose(grads[0], dh, rtol=1e-4, atol=1e-6)  # d/d log pi(chosen)
    np.testing.assert_allclose(grads[1], -dh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "hi", "chosen": "a", "rejected": "a"}, "are the same reply ('a')"),
        ({"prompt": "hi", "chosen": " ", "rejected": "a"}, "the 'chosen' reply is empty"),
        ({"prompt": "hi", "chosen": "a"}, "expected 'chosen' and 'rejected', got keys"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
        ({"chosen": "a", "rejected": "b"}, "without a 'prompt'"),
        (
            {
                "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                "rejected": [
                    {"role": "user", "content": "y"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "the same turns before the reply",
        ),
        (
            {
                "prompt": "hi",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                "rejected": "b",
            },
            "the last turn of 'chosen' must be the assistant's",
        ),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_pairs_are_named(record, message):
    with pytest.raises(ValueError, match="pairs.jsonl record 3: .*" + re.escape(message)):
        pair_conversations(json.dumps(record), "pairs.jsonl record 3")


def test_record_forms_agree_and_only_the_reply_is_trained_on():
    user = {"role": "user", "content": "2+2="}
    forms = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": [user], "chosen": "4", "rejected": "5"},
        {
            "chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}],
        },
    ]
    units = [encode_pair(json.dumps(f), TOK, PLAIN, 64) for f in forms]
    for u in units[1:]:
        for k in u:
            np.testing.assert_array_equal(u[k], units[0][k])
    u = units[0]
    text = TOK.decode(u["tokens"].tolist())
    n_chosen = int(np.sum(u["half"] == 0))
    trained = TOK.decode(u["tokens"][u["train"] == 1].tolist())
    # Each half is the same prompt then its reply; only the replies (and their end of turn) train.
    assert TOK.decode(u["tokens"][:n_chosen].tolist()).rstrip().endswith("4")
    assert "2+2=" in text and "2+2=" not in trained and "4" in trained and "5" in trained


def _pairs(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6)))
        out.append({"prompt": word, "chosen": word.upper(), "rejected": word})
    return out


def test_packing_keeps_pairs_whole_and_the_log_probs_equal_each_sequence_alone():
    records = [json.dumps(p) for p in _pairs(40, 1)]
    ds = build_preference_dataset(records, TOK, template=PLAIN, seq_len=256, batch_size=4, seed=0)
    batch = next(iter(ds))
    seg = batch["segment_ids"]
    for row in seg:
        ids = sorted(set(row.tolist()) - {0})
        assert ids == list(range(1, len(ids) + 1)) and len(ids) % 2 == 0  # whole pairs only
    assert max(len(set(r.tolist())) for r in seg) > 3  # several pairs share a row

    config = load_config("tiny", ["model.max_seq_len=256"]).model
    model = Transformer(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    logits, _, _ = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    logp = _log_softmax(logits)
    token_logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["mask"]
    chosen, rejected, valid = pair_sums(
        jnp.asarray(token_logp, jnp.float32), batch["segment_ids"], batch["mask"]
    )
    # Reference: each sequence run on its own (unpacked), log-softmax in NumPy, summed by hand
    # over its reply's targets.
    for b in range(seg.shape[0]):
        for k in range(int(seg[b].max()) // 2):
            for s, got in ((2 * k + 1, chosen[b, k]), (2 * k + 2, rejected[b, k])):
                at = np.flatnonzero(seg[b] == s)
                # Right-padded to one length (one compile): a causal model's earlier positions
                # do not see the padding.
                tokens = np.zeros((1, 128), np.int32)
                tokens[0, : len(at)] = batch["tokens"][b, at]
                alone = _log_softmax(forward(params, tokens)[0][0, : len(at)])
                tgt, m = batch["targets"][b, at], batch["mask"][b, at]
                want = sum(alone[i, tgt[i]] for i in range(len(at)) if m[i])
                np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-3)
            assert valid[b, k]
        assert not np.asarray(valid[b, int(seg[b].max()) // 2 :]).any()


def test_dpo_without_adapters_or_a_reference_is_refused(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(30, 0)))
    cfg = load_config("tiny", ["task.kind=dpo", f"data.dataset={tmp_path / 'p.jsonl'}"])
    with pytest.raises(ValueError, match=r"set model\.lora\.rank=8\) or prompt tuning"):
        RunPlan(cfg)
    with pytest.raises(ValueError, match=r"TaskConfig\.beta=0\.0 must be > 0"):
        load_config("tiny", ["task.kind=dpo", "task.beta=0"])


def test_dpo_learns_a_held_out_preference(tmp_path, monkeypatch):
    """Pairs prefer the prompt's word in capitals over the same word as written; held out (the
    validation split's words never trained on), the policy prefers the chosen reply about half
    the time before and >= 90% after, and the implicit-reward accuracy reaches >= 90% too."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in _pairs(1200, 0)))
    config = load_config(
        "tiny",
        [
            "model.vocab_size=320",
            "model.lora.rank=8",
            "model.lora.alpha=16",
            "model.lora.targets=query,value,out,up,down",
            "task.kind=dpo",
            "task.beta=0.1",
            f"data.dataset={path}",
            "data.seq_len=128",
            "data.batch_size=16",
            "train.steps=60",
            "train.eval_every=60",
            "train.eval_batches=4",
            "train.log_every=20",
            "train.sample_tokens=0",
            "optim.learning_rate=1e-2",
            "optim.warmup_steps=5",
            "checkpoint.every=1000",
        ],
    )
    plan = RunPlan(config)
    before = loop.evaluate(plan, plan.init_state().params, max_batches=4)
    assert 0.25 < before["eval_policy_accuracy"] < 0.75, before
    result = loop.train(config, tmp_path / "work")
    after = loop.evaluate(plan, result["state"].params, max_batches=4)
    assert after["eval_pairs"] >= 40
    assert after["eval_policy_accuracy"] >= 0.9, after
    assert after["eval_accuracy"] >= 0.9 and after["eval_margin"] > 0, after
    logged = [h for h in result["history"] if "accuracy" in h]
    assert logged[-1]["rewards_chosen"] > logged[-1]["rewards_rejected"]


def test_full_fine_tuning_dpo_learns_against_a_frozen_copy_of_its_start(tmp_path, monkeypatch):
    """Without adapters the reference is the --init-from checkpoint, held frozen: at step 0
    the policy equals it (every pair's loss is log 2), each batch's `ref_logp` is that model's
    token log-probs however far the policy has moved, and DPO still learns the preference."""
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in _pairs(1200, 0)))
    common = [f"data.dataset={path}", "data.seq_len=128", "data.batch_size=16"]
    common += ["train.sample_tokens=0", "checkpoint.every=1000", "train.eval_batches=4"]
    # The model to start from: 2 LM steps on a corpus of the pairs' prompts.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "words.txt").write_text(" ".join(p["prompt"] for p in _pairs(2000, 5)))
    lm = ["train.steps=2", "train.eval_every=1000", "train.sample_tokens=0", "data.seq_len=128"]
    loop.train(load_config("tiny", [f"data.dataset={corpus}", *lm]), tmp_path / "start")
    config = load_config(
        "tiny",
        [
            *common,
            "task.kind=dpo",
            "task.beta=0.1",
            "train.steps=40",
            "train.eval_every=40",
            "train.log_every=1",
            "optim.learning_rate=3e-3",
            "optim.warmup_steps=5",
            f"train.init_from={tmp_path / 'start'}",
        ],
    )
    with pytest.raises(ValueError, match=r"a full fine-tune needs a frozen copy"):
        RunPlan(
            dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=None))
        )
    result = loop.train(config, tmp_path / "work")
    assert result["history"][0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    plan = RunPlan(config)
    after = loop.evaluate(plan, result["state"].params, max_batches=4)
    assert after["eval_policy_accuracy"] >= 0.9 and after["eval_accuracy"] >= 0.9, after
    # The reference is the starting checkpoint, bitwise, and scores each batch with it.
    _, _, start_params, _ = load_for_eval(tmp_path / "start")
    reference = plan.rollouts
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(start_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    it = plan.make_iterator()
    batch = to_global(next(it), plan.mesh, it.rows, it.global_batch)
    got = np.asarray(reference.train_batch(result["state"], batch)["ref_logp"])
    model = Transformer(config.model)
    logits = model.apply(
        {"params": start_params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )[0]
    logp = _log_softmax(np.asarray(logits))
    tgt, mask = np.asarray(batch["targets"]), np.asarray(batch["mask"])
    want = np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
