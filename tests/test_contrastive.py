"""Contrastive embeddings (task.kind=contrastive): pooling and in-batch InfoNCE against NumPy
over the whole global batch on 8 devices, retrieval learnt on docstring / signature pairs from
the standard library (the default corpus), SimCSE views, and bad input."""

import ast
import dataclasses
import json
import random
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import loop
from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer, DataIterator, stdlib_files
from jaxlm.data.contrastive import build_contrastive_dataset
from jaxlm.encode import embed
from jaxlm.model.transformer import Transformer, init_params
from jaxlm.run import RunPlan, load_for_eval
from jaxlm.sharding import make_mesh, use_mesh
from jaxlm.tasks import get_task
from tests.random_params import random_params

TOK = ByteTokenizer()
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta", "iota"]


def _pairs(n, seed=0):
    r = random.Random(seed)
    return [
        {"anchor": " ".join(r.sample(WORDS, 3)), "positive": " ".join(r.sample(WORDS, 2))}
        for _ in range(n)
    ]


def _numpy_pool(hidden, segments, seg_id, pooling):
    rows = np.flatnonzero(segments == seg_id)
    if pooling == "mean":
        return hidden[rows].mean(0)
    return hidden[rows[0] if pooling == "cls" else rows[-1]]


def _numpy_info_nce(anchors, positives, temperature):
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    p = positives / np.linalg.norm(positives, axis=1, keepdims=True)
    sim = a @ p.T / temperature
    sim = sim - sim.max(1, keepdims=True)
    logp = sim - np.log(np.exp(sim).sum(1, keepdims=True))
    return -np.diag(logp), np.argmax(sim, 1) == np.arange(len(a))


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_info_nce_over_the_global_batch_on_8_devices_matches_numpy(pooling, tmp_path):
    """Packed pair batches sharded over 8 devices: the task's summed loss and correct count
    equal NumPy's InfoNCE over every pair of the global batch (pooled from the model's last
    hidden states), not the per-device one."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(200)))
    config = load_config(
        "tiny-bert",
        [
            f"data.dataset={data}",
            "task.kind=contrastive",
            f"task.pooling={pooling}",
            "task.contrastive_temperature=0.1",
            "data.seq_len=128",
            "data.batch_size=8",
        ],
    )
    ds = build_contrastive_dataset(_pairs(200), TOK, seq_len=128, batch_size=8, seed=0)
    batch = next(DataIterator(ds))
    params = random_params(config.model, seed=4)
    hidden = np.asarray(
        Transformer(config.model).apply(
            {"params": params},
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            hidden=True,
        )[0]
    )
    anchors, positives, shard = [], [], []
    for b in range(8):
        seg = batch["segment_ids"][b]
        for k in range(1, seg.max() // 2 + 1):
            anchors.append(_numpy_pool(hidden[b], seg, 2 * k - 1, pooling))
            positives.append(_numpy_pool(hidden[b], seg, 2 * k, pooling))
            shard.append(b)
    anchors, positives, shard = np.array(anchors), np.array(positives), np.array(shard)
    assert len(anchors) > 20  # rows pack several pairs
    loss, correct = _numpy_info_nce(anchors, positives, 0.1)

    mesh = make_mesh(config.mesh)  # 8 devices on the fsdp axis, the batch split over them
    sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    assert len(sharded["tokens"].sharding.device_set) == 8
    task = get_task(config)
    with use_mesh(mesh, config.mesh.rules):
        terms = jax.jit(task.loss_terms)(params, sharded)
    assert float(terms["pairs"]) == len(anchors)
    np.testing.assert_allclose(float(terms["loss"]), loss.sum(), rtol=1e-4)
    assert float(terms["correct"]) == correct.sum()
    # Negatives from one device's rows only would give another loss.
    local = sum(
        _numpy_info_nce(anchors[shard == b], positives[shard == b], 0.1)[0].sum() for b in range(8)
    )
    assert abs(local - loss.sum()) > 1.0


def _docstring_pairs():
    """(first docstring line, "def name(args)") of the standard library's functions."""
    out = []
    for path in sorted(stdlib_files())[:400]:
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and len(doc.strip().splitlines()[0]) > 10:
                args = ", ".join(a.arg for a in node.args.args)
                out.append(
                    {
                        "anchor": doc.strip().splitlines()[0][:80],
                        "positive": f"def {node.name}({args})"[:60],
                    }
                )
    random.Random(0).shuffle(out)
    return out


def _retrieval(config, params, held_out):
    a = embed(config.model, params, TOK, [p["anchor"] for p in held_out], config.task.pooling)
    p = embed(config.model, params, TOK, [p["positive"] for p in held_out], config.task.pooling)
    return np.mean(np.argmax(a @ p.T, axis=1) == np.arange(len(held_out)))


def test_docstring_to_signature_retrieval_is_learnt(tmp_path, monkeypatch):
    """A tiny encoder trained on pairs from the default corpus retrieves the held-out
    signature of a docstring among 200 (chance 0.5%) far better than before training."""
    pairs = _docstring_pairs()
    assert len(pairs) > 2000
    held_out, train = pairs[:200], pairs[200:]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in train))
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path / "cache"))
    config = load_config(
        "tiny-bert",
        [
            f"data.dataset={data}",
            "task.kind=contrastive",
            "data.seq_len=128",
            "data.batch_size=16",
            "train.steps=300",
            "train.eval_every=100000",
            "train.eval_batches=4",
            "train.sample_tokens=0",
            "train.log_every=100",
            "optim.warmup_steps=20",
            "checkpoint.every=100000",
        ],
    )
    before = _retrieval(config, init_params(config.model, jax.random.key(0)), held_out)
    loop.train(config, tmp_path / "run")
    trained, mesh, params, _ = load_for_eval(tmp_path / "run")
    with use_mesh(mesh, trained.mesh.rules):
        after = _retrieval(trained, params, held_out)
    assert after >= 0.15 and after > 2 * before, (before, after)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m][-1] > 0.3


def test_simcse_views_differ_by_dropout_only(tmp_path):
    """A record with one text gives two identical sequences; with model.dropout their
    embeddings differ while training (a dropout rng) and are equal in evaluation."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": p["anchor"]}) + "\n" for p in _pairs(50)))
    overrides = [f"data.dataset={data}", "task.kind=contrastive", "data.batch_size=8"]
    with pytest.raises(ValueError, match=r"one text.*but model\.dropout=0"):
        RunPlan(load_config("tiny-bert", overrides), tokenizer=TOK)
    config = load_config("tiny-bert", [*overrides, "model.dropout=0.1", "model.scan_layers=false"])
    RunPlan(config, tokenizer=TOK)  # accepted
    ds = build_contrastive_dataset(
        [json.dumps({"text": f"alpha beta {i}"}) for i in range(4)], TOK, seq_len=32, batch_size=2
    )
    batch = next(DataIterator(ds))
    seg = batch["segment_ids"][0]
    np.testing.assert_array_equal(batch["tokens"][0][seg == 1], batch["tokens"][0][seg == 2])
    task = get_task(config)
    params = random_params(config.model, seed=0)
    no_noise = task.loss_terms(params, batch)
    noisy = task.loss_terms(params, batch, jax.random.key(1))
    # Identical views: each anchor's own positive is its nearest, at cosine 1.
    assert float(no_noise["correct"]) == float(no_noise["pairs"])
    assert float(noisy["loss"]) != pytest.approx(float(no_noise["loss"]), rel=1e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batch_size=1"], "data.batch_size=1; use at least 2"),
        (["train.microbatches=2"], "train.microbatches=2; set train.microbatches=1"),
        (["task.pooling=max"], "TaskConfig.pooling='max' must be one of"),
        (["task.contrastive_temperature=0"], "contrastive_temperature=0.0 must be a finite"),
    ],
)
def test_bad_contrastive_configs_are_refused(tmp_path, overrides, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _pairs(20)))
    base = [f"data.dataset={data}", "task.kind=contrastive", "data.batch_size=4"]
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        RunPlan(load_config("tiny-bert", [*base, *overrides]), tokenizer=TOK)


def test_a_record_without_a_pair_is_named(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"a b {i}"}) + "\n" for i in range(30)))
    with pytest.raises(ValueError, match="expected 'anchor' and 'positive'"):
        RunPlan(
            load_config("tiny-bert", [f"data.dataset={data}", "task.kind=contrastive"]),
            tokenizer=TOK,
        )


def test_embeddings_are_unit_vectors_of_the_pooled_text(tmp_path):
    config = dataclasses.replace(load_config("tiny-bert", []).model, scan_layers=False)
    params = random_params(config, seed=0)
    texts = ["alpha beta", "gamma", "alpha beta gamma delta"]
    vectors = embed(config, params, TOK, texts, "mean", batch_size=2)
    for text, v in zip(texts, vectors, strict=True):
        ids = np.asarray([[TOK.bos_id, *TOK.encode(text), TOK.eos_id]])
        hidden = Transformer(config).apply({"params": params}, ids, hidden=True)[0][0]
        want = np.asarray(hidden).mean(0)
        np.testing.assert_allclose(v, want / np.linalg.norm(want), atol=1e-5)
    with pytest.raises(ValueError, match="pooling='max' must be one of"):
        embed(config, params, TOK, texts, "max")


def test_plain_text_is_refused_with_the_record_format(tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("def f(x):\n    return x\n" * 40)
    config = load_config("tiny-bert", [f"data.dataset={data}", "task.kind=contrastive"])
    with pytest.raises(ValueError, match=r"set data\.dataset to such JSONL files"):
        RunPlan(config, tokenizer=TOK)
