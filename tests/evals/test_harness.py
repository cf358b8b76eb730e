"""lm-evaluation-harness in process, offline: local YAML tasks over JSONL written here. The
adapter's log-likelihoods equal a NumPy forward pass, and the harness's accuracy, exact match
and bits per byte equal those computed independently from it."""

import math

import numpy as np
import pytest

from jaxlm.configs.overrides import load_config
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.evals.harness import (
    JaxlmLM,
    check_task_file,
    headline,
    resolve_tasks,
    run_tasks,
    write_task,
)
from tests.evals.test_scoring import WINDOW, _logprobs, _reference
from tests.random_params import random_params

CONFIG = load_config("tiny", [f"model.max_seq_len={WINDOW}", "model.scan_layers=false"])
BOS = 1 if CONFIG.data.add_bos else None


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG.model, seed=3)


@pytest.fixture(scope="module")
def lm(params):
    return JaxlmLM(CONFIG, params, ByteTokenizer(), batch_size=4, max_gen_toks=6)


def mc_task(directory, name, docs, **fields):
    """A multiple-choice task over {"q", "choices", "answer"} records."""
    return write_task(
        directory,
        name,
        docs,
        output_type="multiple_choice",
        doc_to_text="{{q}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{answer}}",
        **fields,
    )


def _encode(text):
    ids = ByteTokenizer().encode(text)
    return ids


def _ids(context):
    return ([BOS] if BOS is not None else []) + _encode(context)


MC_DOCS = [
    {"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": i % 3}
    for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 3), (6, 6), (9, 1), (4, 8)])
]


def test_multiple_choice_accuracy_equals_one_computed_from_numpy_log_probs(tmp_path, lm, params):
    task = mc_task(
        tmp_path,
        "sums_mc",
        MC_DOCS,
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
    )
    out = run_tasks(lm, [str(task)], num_fewshot=2, log_samples=True)
    samples = out["samples"]["sums_mc"]
    assert len(samples) == len(MC_DOCS)
    hits, hits_norm = [], []
    for s in samples:
        ours = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            assert context.count("\n\n") == 2  # two few-shot examples before the question
            want, greedy = _reference(params, _ids(context), _encode(continuation))
            np.testing.assert_allclose(resp[0][0], want, rtol=1e-5, atol=2e-4)
            assert resp[0][1] == greedy
            ours.append((want, len(continuation.removeprefix(" "))))  # the choice's length
        hits.append(int(np.argmax([w for w, _ in ours])) == s["target"])
        hits_norm.append(int(np.argmax([w / n for w, n in ours])) == s["target"])
    flat = headline(out)
    assert flat["sums_mc/acc"] == pytest.approx(np.mean(hits))
    assert flat["sums_mc/acc_norm"] == pytest.approx(np.mean(hits_norm))
    assert 0 < np.mean(hits) < 1 or 0 < np.mean(hits_norm) < 1  # not a trivial answer


def _greedy_text(params, prompt, budget, until):
    ids = list(prompt)
    new = []
    for _ in range(budget):
        token = int(_logprobs(params, ids)[-1].argmax())
        if token == ByteTokenizer.eos_id:
            break
        ids.append(token)
        new.append(token)
        if token == _encode(until)[0]:
            break
    return ByteTokenizer().decode(new, errors="replace").split(until, 1)[0]


def test_generation_exact_match_equals_greedy_decoding_by_hand(tmp_path, lm, params):
    questions = ["abc", "hello", "x = 1", "def f", "The cat", "42"]
    docs = []
    for i, q in enumerate(questions):
        want = _greedy_text(params, _ids(f"Q: {q}\nA:"), 6, "\n")
        docs.append({"q": q, "a": want if i % 2 == 0 else "not this"})
    task = write_task(
        tmp_path,
        "echo_gen",
        docs,
        output_type="generate_until",
        doc_to_text="Q: {{q}}\nA:",
        doc_to_target="{{a}}",
        target_delimiter="",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )
    out = run_tasks(lm, [str(task)], log_samples=True)
    samples = sorted(out["samples"]["echo_gen"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    assert got == [_greedy_text(params, _ids(f"Q: {q}\nA:"), 6, "\n") for q in questions]
    assert headline(out)["echo_gen/exact_match"] == pytest.approx(0.5)


def test_rolling_log_likelihood_gives_the_bits_per_byte_of_the_numpy_model(tmp_path, lm, params):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    texts = ["short text", "a longer document " * 7]  # 126 bytes: three windows
    task = write_task(
        tmp_path,
        "docs_ppl",
        [{"text": t} for t in texts],
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "bits_per_byte"}, {"metric": "byte_perplexity"}],
    )
    out = run_tasks(lm, [str(task)])
    prefix = BOS if BOS is not None else ByteTokenizer.eos_id
    nll = 0.0
    for text in texts:
        windows = get_rolling_token_windows(_encode(text), prefix, WINDOW, context_len=1)
        nll -= sum(_reference(params, *make_disjoint_window(w))[0] for w in windows)
    total_bytes = sum(len(t.encode()) for t in texts)
    flat = headline(out)
    assert flat["docs_ppl/bits_per_byte"] == pytest.approx(nll / total_bytes / math.log(2), 1e-5)
    assert flat["docs_ppl/byte_perplexity"] == pytest.approx(math.exp(nll / total_bytes), 1e-5)


def test_long_contexts_are_cut_from_the_left_and_reported(tmp_path, params):
    messages = []
    lm = JaxlmLM(CONFIG, params, ByteTokenizer(), batch_size=2, log=messages.append)
    long_q = " ".join(["word"] * 20)  # 99 bytes, past the 48-token window
    task = mc_task(
        tmp_path,
        "long_mc",
        [{"q": long_q, "choices": ["yes", "no"], "answer": 0}],
    )
    out = run_tasks(lm, [str(task)], log_samples=True)
    (sample,) = out["samples"]["long_mc"]
    context, continuation = sample["arguments"][0]
    want, _ = _reference(params, _ids(context), _encode(continuation))  # cut by hand
    assert sample["resps"][0][0][0] == pytest.approx(want, rel=1e-5, abs=2e-4)
    assert any("2 of 2 requests are longer than the model's context of 48" in m for m in messages)
    assert lm.truncated == 2
    # Generation: the context keeps its last 48 - 6 tokens, room for 6 new ones.
    gen = write_task(
        tmp_path,
        "long_gen",
        [{"q": long_q, "a": "x"}],
        output_type="generate_until",
        doc_to_text="{{q}}",
        doc_to_target="{{a}}",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 6},
    )
    out = run_tasks(lm, [str(gen)], log_samples=True)
    (sample,) = out["samples"]["long_gen"]
    assert sample["resps"][0][0] == _greedy_text(params, _ids(long_q)[-42:], 6, "\n")
    assert any("1 of 1 generation requests had their contexts cut" in m for m in messages)
    assert lm.truncated == 3


def test_task_files_that_do_not_parse_are_named_with_their_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\ndataset_path: json\ndoc_to_text: [unclosed\nmetric_list: 1\n")
    with pytest.raises(ValueError, match=r"task file .*bad\.yaml:4: does not parse"):
        check_task_file(bad)
    with pytest.raises(ValueError, match=r"bad\.yaml:4"):
        resolve_tasks(["some_task"], include_paths=[tmp_path])
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ValueError, match=r"notask\.yaml:1: has no 'task'"):
        resolve_tasks([str(tmp_path / "notask.yaml")])
    with pytest.raises(FileNotFoundError, match=r"task file 'missing\.yaml' does not exist"):
        resolve_tasks(["missing.yaml"])


def test_unknown_task_names_list_the_close_ones():
    with pytest.raises(ValueError, match=r"unknown task 'hellaswagg'.*close: hellaswag"):
        resolve_tasks(["hellaswagg"])


def test_bad_limits_and_shots_are_refused(lm):
    with pytest.raises(ValueError, match="limit=0 must be an integer >= 1"):
        run_tasks(lm, ["x.yaml"], limit=0)
    with pytest.raises(ValueError, match="num_fewshot=-1 must be an integer >= 0"):
        run_tasks(lm, ["x.yaml"], num_fewshot=-1)
    with pytest.raises(ValueError, match="no tasks given"):
        run_tasks(lm, [" "])
    with pytest.raises(ValueError, match="needs a causal model"):
        JaxlmLM(load_config("tiny-bert"), None, ByteTokenizer())


def test_chat_template_prompts_are_the_runs_template_with_eos_after_each_reply(tmp_path):
    config = load_config("tiny", ["model.max_seq_len=128", "model.scan_layers=false"])
    params = random_params(config.model, seed=5)
    lm = JaxlmLM(config, params, ByteTokenizer(), batch_size=4)
    task = mc_task(
        tmp_path,
        "chat_mc",
        MC_DOCS[:4],
    )
    out = run_tasks(
        lm,
        [str(task)],
        num_fewshot=1,
        log_samples=True,
        apply_chat_template=True,
        system_instruction="Be brief.",
    )
    eos = [ByteTokenizer.eos_id]
    for s in out["samples"]["chat_mc"]:
        prompt = s["arguments"][0][0]
        (shot,) = [d for d in MC_DOCS[:4] if d != s["doc"] and f"User:\n{d['q']}\n" in prompt]
        # The "plain" template by hand: turns as "### Role:" blocks, EOS after the reply.
        head = f"### System:\nBe brief.\n\n### User:\n{shot['q']}\n\n### Assistant:\n"
        head += shot["choices"][shot["answer"]]
        # The harness moves the prompt's trailing newline into the continuation.
        tail = f"\n\n### User:\n{s['doc']['q']}\n\n### Assistant:"
        context = _ids(head) + eos + _encode(tail)
        for (_, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            want, _ = _reference(params, context, _encode("\n" + continuation), config.model)
            np.testing.assert_allclose(resp[0][0], want, rtol=1e-5, atol=2e-4)
