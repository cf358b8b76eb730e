"""On an HF-imported tiny Llama, jaxlm's harness model gives the log-likelihoods, rolling
log-likelihoods and greedy generations of lm-evaluation-harness's own Hugging Face backend."""

import json

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from jaxlm.data import HFTokenizer
from jaxlm.data.tokenizer import SPECIAL_TOKENS
from jaxlm.evals.harness import JaxlmLM
from jaxlm.interop import hf
from tests.interop import hf_models
from tests.interop.test_hf_workdir import TEXT

REQUESTS = [
    ("def add(a, b):", " return a + b"),
    ("class", " Point:"),
    ("class", " Foo(Point):"),  # the same context: run once for both
    ("", "x: int = 0"),  # empty context: conditioned on BOS
    ("class Point:\n   ", " x: int"),  # trailing spaces move to the continuation
    (TEXT[:400], "\nclass"),  # longer than the 64-token context: cut from the left
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-harness")
    directory = root / "llama"
    directory.mkdir()
    hf_models.build("llama3", directory, seed=1)
    (root / "corpus.txt").write_text(TEXT)
    HFTokenizer.train_bpe([root / "corpus.txt"], vocab_size=300).save(root / "tok")
    (directory / "tokenizer.json").write_bytes((root / "tok/tokenizer.json").read_bytes())
    pad, bos, eos = SPECIAL_TOKENS
    settings = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    run = hf.import_checkpoint(directory, root / "run")
    ours = JaxlmLM.from_workdir(run, batch_size=4, max_gen_toks=12)
    assert ours.add_bos and ours.max_length == 64
    kwargs = dict(pretrained=str(directory), device="cpu", batch_size=4, dtype="float32")
    return ours, directory, kwargs


def test_loglikelihoods_equal_the_harness_hf_backend(models):
    ours, _, kwargs = models
    theirs = HFLM(**kwargs, add_bos_token=True, max_length=64)  # jaxlm's import keeps BOS
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert ours.truncated == 1


def test_rolling_loglikelihoods_equal_the_harness_hf_backend(models):
    ours, _, kwargs = models
    theirs = HFLM(**kwargs, max_length=64)  # documents conditioned on BOS, as jaxlm's
    docs = [TEXT[:50], TEXT[:700]]  # the second spans several 64-token windows
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    got, want = ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-6)


def test_greedy_generations_equal_the_harness_hf_backend(models):
    ours, _, kwargs = models
    theirs = HFLM(**kwargs, add_bos_token=True, max_length=64)
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    prompts = ["def add(a, b):\n", "class Point:\n    x", "return"]
    requests = [Instance("generate_until", {}, (p, dict(gen)), i) for i, p in enumerate(prompts)]
    got, want = ours.generate_until(requests), theirs.generate_until(requests)
    assert got == want
    assert any(got)
