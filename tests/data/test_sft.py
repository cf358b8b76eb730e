"""The SFT pipeline and task: packed conversations whose loss mask covers exactly the assistant
tokens (a naive per-conversation reference), truncation counted, bad records named."""

import json

import numpy as np
import pytest

from jaxlm.configs.overrides import load_config
from jaxlm.data import ByteTokenizer
from jaxlm.data.chat import conversation, encode_chat, get_template
from jaxlm.data.sft import build_chat_dataset, chat_stats
from jaxlm.run import RunPlan

TOK = ByteTokenizer()
RECORDS = [
    json.dumps({"prompt": f"add {a} and {b}", "completion": str(a + b)})
    for a in range(12)
    for b in range(3)
] + [
    json.dumps(
        {
            "messages": [
                {"role": "system", "content": "Reply in one word."},
                {"role": "user", "content": f"colour {i}?"},
                {"role": "assistant", "content": "blue" * (1 + i % 3)},
                {"role": "user", "content": "sure?"},
                {"role": "assistant", "content": "yes"},
            ]
        }
    )
    for i in range(6)
]


def _naive(record, seq_len):
    """The (input, target) pairs a conversation must contribute, and which are trained on."""
    ids, mask = encode_chat(conversation(record), TOK, get_template("plain", TOK))
    ids, mask = ids[:seq_len], mask[:seq_len]
    return [(ids[t], ids[t + 1], mask[t + 1]) for t in range(len(ids) - 1)]


def test_packed_rows_hold_whole_conversations_with_assistant_only_targets():
    seq_len = 160
    template = get_template("plain", TOK)
    ds = build_chat_dataset(
        RECORDS,
        TOK,
        template=template,
        seq_len=seq_len,
        batch_size=4,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    got = []  # per segment: (input, target, trained) of every position with a real next token
    for batch in ds:
        for row in range(len(batch["tokens"])):
            seg = batch["segment_ids"][row]
            for s in sorted(set(seg[seg > 0])):
                at = np.flatnonzero(seg == s)
                assert np.array_equal(batch["positions"][row][at], np.arange(len(at)))
                got.append(
                    [
                        (batch["tokens"][row][t], batch["targets"][row][t], batch["mask"][row][t])
                        for t in at[:-1]
                    ]
                )
                assert not batch["mask"][row][at[-1]]  # no target across conversations
    want = [_naive(r, seq_len) for r in RECORDS]
    # Every conversation appears exactly once, whole (never split across rows).
    norm = lambda pairs: [(int(a), int(b) if m else -1, bool(m)) for a, b, m in pairs]
    assert sorted(map(norm, got)) == sorted(map(norm, want))
    stats = chat_stats(RECORDS, TOK, template, seq_len)
    assert stats.records == len(RECORDS) and stats.truncated == 0 and stats.dropped == 0
    assert stats.trained_tokens == sum(m for pairs in want for _, _, m in pairs)


def test_truncation_is_counted_and_empty_conversations_dropped():
    template = get_template("plain", TOK)
    long_prompt = json.dumps({"prompt": "x" * 200, "completion": "ok"})
    records = [long_prompt, RECORDS[0]]
    stats = chat_stats(records, TOK, template, 64)
    assert (stats.truncated, stats.dropped) == (1, 1)
    ds = build_chat_dataset(
        records,
        TOK,
        template=template,
        seq_len=64,
        batch_size=2,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    batches = list(ds)
    assert sum(int(b["mask"].sum()) for b in batches) == stats.trained_tokens > 0
    assert not any(np.isnan(b["target_bytes"]).any() for b in batches)


def _write(tmp_path, lines):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sft_config(path, *overrides):
    return load_config(
        "tiny",
        [
            "task.kind=sft",
            f"data.dataset={path}",
            "data.seq_len=64",
            "data.batch_size=8",
            *overrides,
        ],
    )


def test_sft_plan_checks_every_record_before_anything_runs(tmp_path, stdlib_cache):
    good = RECORDS * 3
    bad = _write(tmp_path, [*good, json.dumps({"messages": [{"role": "bot", "content": "x"}]})])
    # Named by the file's own line (the record's index in the hashed split means nothing).
    where = rf"chat\.jsonl:{len(good) + 1}: message 0: unknown role .bot."
    with pytest.raises(ValueError, match=where):
        RunPlan(_sft_config(bad))
    (tmp_path / "chat.jsonl").unlink()
    none = _write(tmp_path, [json.dumps({"prompt": "x" * 300, "completion": "y"})] * 40)
    with pytest.raises(ValueError, match="no trainable token at all"):
        RunPlan(_sft_config(none))
    with pytest.raises(ValueError, match="chat_template='chatgpt' is not a template"):
        _sft_config(none, "task.chat_template=chatgpt")


def test_sft_batches_fit_the_plan(tmp_path, stdlib_cache):
    path = _write(tmp_path, RECORDS * 3)
    plan = RunPlan(_sft_config(path))
    it = plan.make_iterator()
    batch = next(it)
    spec = plan.abstract_batch()
    assert set(batch) == set(spec)
    assert batch["mask"].sum() > 0
    # Loss only on replies: every trained target is an assistant byte or the EOS id.
    replies = "".join(str(a + b) for a in range(12) for b in range(3)) + "blueyes"
    trained = batch["targets"][batch["mask"]]
    assert all(t == TOK.eos_id or chr(t - 3) in replies for t in trained)


def test_a_tfds_dataset_of_conversations_trains_like_jsonl(tmp_path, stdlib_cache):
    import tensorflow_datasets as tfds

    conversations = [json.loads(r) for r in RECORDS * 2]
    conversations = [conversation(c) for c in conversations]

    class TinyChatForJaxlmTest(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            messages = tfds.features.Sequence(
                {"role": tfds.features.Text(), "content": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"messages": messages})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0), "validation": self._generate_examples(1)}

        def _generate_examples(self, part):
            for i, c in enumerate(conversations):
                if i % 10 == 0 or part == 0:
                    yield f"{part}-{i}", {"messages": c}

    TinyChatForJaxlmTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = load_config(
        "tiny",
        [
            "task.kind=sft",
            "data.dataset=tfds:tiny_chat_for_jaxlm_test",
            f"data.data_dir={tmp_path}",
            "data.seq_len=128",
            "data.batch_size=8",
            "data.shuffle=false",
            "data.download=false",
        ],
    )
    plan = RunPlan(cfg)
    from jaxlm.data import open_source
    from jaxlm.data.sources import RECORD_KEY

    source = open_source(cfg.data.dataset, "train", data_dir=str(tmp_path), text_key=RECORD_KEY)
    # TFDS stores records in its own order; each one reads back as the conversation written.
    written = {json.dumps(c) for c in conversations}
    assert len(source) == len(conversations)
    assert all(json.dumps(conversation(source[i])) in written for i in range(len(source)))
    batch = next(plan.make_iterator())
    assert batch["mask"].sum() > 0


def test_a_prefix_lm_reads_each_first_prompt_as_its_prefix():
    """With `prefix=True` (a prefix-LM model), each conversation's prefix is exactly its first
    prompt as the template renders it for generation (what sampling prefills), nothing else."""
    template = get_template("plain", TOK)
    ds = build_chat_dataset(
        RECORDS,
        TOK,
        template=template,
        prefix=True,
        seq_len=160,
        batch_size=4,
        num_epochs=1,
        drop_remainder=False,
    )
    want = set()
    for record in RECORDS:
        turns = conversation(record)
        first = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
        head, _ = encode_chat(turns[:first], TOK, template, add_generation_prompt=True)
        want.add(tuple(head))
    got = set()
    for batch in ds:
        for row in range(len(batch["tokens"])):
            seg = batch["segment_ids"][row]
            assert not batch["prefix"][row][seg == 0].any()
            for s in set(seg[seg > 0]):
                at = np.flatnonzero(seg == s)
                prefix = batch["prefix"][row][at]
                k = int(prefix.sum())
                assert prefix[:k].all() and batch["mask"][row][at[k - 1]]  # then the reply
                got.add(tuple(int(x) for x in batch["tokens"][row][at[:k]]))
    assert got == want
