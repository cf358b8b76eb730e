"""Reward models as Hugging Face one-label sequence classifiers (`*ForSequenceClassification`):
import, export and the score at the last token against transformers, for GPT-2 and Llama."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.interop import hf  # noqa: E402
from jaxlm.interop.safetensors_io import SafetensorsDir  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402
from tests.interop import hf_models  # noqa: E402

PAD = 0


def _build(family, directory, labels=1):
    cls, kwargs = hf_models.FAMILIES[family]
    common = {**hf_models._COMMON, "pad_token_id": PAD}
    config = getattr(transformers, cls)(**common, **kwargs, num_labels=labels)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    hf_models.randomize(model, 3)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_reward_model_scores_equal_transformers_both_ways(family, tmp_path):
    model = _build(family, tmp_path / "hf")
    config = hf.load_model_config(tmp_path / "hf")
    assert config.head == "score"
    params = hf.params_from_hf(tmp_path / "hf", config)
    # Rows of different lengths, right-padded: transformers scores each at its last non-pad token.
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3]
    tokens = np.full((3, 12), PAD, np.int64)
    for r, n in enumerate(lengths):
        tokens[r, :n] = rng.integers(1, hf_models.VOCAB, n)
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()[:, 0]
    segments = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    scores = Transformer(config).apply(
        {"params": params}, jnp.asarray(tokens, jnp.int32), None, jnp.asarray(segments)
    )[0]
    got = np.asarray(scores)[np.arange(3), np.asarray(lengths) - 1, 0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    hf.save_hf(tmp_path / "out", config, jax.device_get(params))
    before, after = SafetensorsDir(tmp_path / "hf"), SafetensorsDir(tmp_path / "out")
    assert after.names() == before.names() and "score.weight" in after.names()
    for name in before.names():
        np.testing.assert_array_equal(after.view(name), before.view(name), err_msg=name)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == [type(model).__name__]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", pad_token_id=PAD
    ).eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(torch.tensor(tokens)).logits.numpy()[:, 0], want, atol=1e-6, rtol=0
        )


def test_a_many_label_classifier_is_refused(tmp_path):
    _build("llama3", tmp_path / "hf", labels=3)
    with pytest.raises(ValueError, match=r"3-label classifier .*one-label sequence classifiers"):
        hf.load_model_config(tmp_path / "hf")


def test_an_imported_reward_model_scores_chats_like_transformers(tmp_path, capsys):
    from jaxlm import cli
    from jaxlm.data import ByteTokenizer
    from jaxlm.data.chat import builtin_template, encode_chat

    model = _build("llama3", tmp_path / "hf")
    assert (
        cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "w")]) == 0
    )
    chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    capsys.readouterr()
    rc = cli.main(["score", "--workdir", str(tmp_path / "w"), "--input", str(tmp_path / "c.jsonl")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    tok = ByteTokenizer()  # the directory has no tokenizer files
    ids = encode_chat(chat, tok, builtin_template("plain", tok))[0]
    with torch.no_grad():
        want = float(model(torch.tensor([ids])).logits[0, 0])
    assert json.loads(out.out)["reward"] == pytest.approx(want, abs=1e-4)
