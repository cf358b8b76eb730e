"""BERT and RoBERTa masked-LM checkpoints against Hugging Face transformers, both directions.

Tiny random encoders are built by transformers (`hf_models.ENCODERS`, every weight, norm scale
and bias random) and saved with `save_pretrained`; jaxlm imports them and must give the same
masked-LM logits on padded batches with token types, export them back to the same tensors, and
a jaxlm encoder exported to a directory must load in transformers with the same logits.
"""

import dataclasses
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
from tests.random_params import random_params  # noqa: E402

B, T = 3, 14
LENGTHS = (T, 9, 5)  # right-padded rows


@dataclasses.dataclass
class Converted:
    family: str
    hf_dir: object
    model: object
    config: object
    params: object


@pytest.fixture(scope="module", params=list(hf_models.ENCODERS))
def converted(request, tmp_path_factory):
    family = request.param
    hf_dir = tmp_path_factory.mktemp(family)
    model = hf_models.build_encoder(family, hf_dir, seed=len(family))
    config = hf.load_model_config(hf_dir)
    return Converted(family, hf_dir, model, config, hf.params_from_hf(hf_dir, config))


def _batch(model_config, seed=0):
    """(tokens, attention mask, token types) of a right-padded batch; pads are the pad id."""
    rng = np.random.default_rng(seed)
    pad = model_config.pad_token_id
    tokens = rng.integers(3, hf_models.VOCAB, (B, T))
    mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    tokens = np.where(mask, tokens, pad)
    types = rng.integers(0, model_config.type_vocab_size, (B, T)) * mask
    return tokens, mask, types


def _hf_logits(model, tokens, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            token_type_ids=torch.tensor(types),
        )
    logits = out.logits if hasattr(out, "logits") else out.prediction_logits
    return logits.numpy()


def _jaxlm_logits(config, params, tokens, mask, types):
    def apply(p, t, s, ty):
        return Transformer(config).apply({"params": p}, t, segment_ids_BT=s, token_types_BT=ty)[0]

    out = jax.jit(apply)(
        params,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask, jnp.int32),  # padding is segment 0
        jnp.asarray(types, jnp.int32),
    )
    return np.asarray(out)


def test_config_is_a_post_ln_bidirectional_masked_lm(converted):
    cfg, hf_cfg = converted.config, converted.model.config
    assert (cfg.causal, cfg.head, cfg.norm_position, cfg.embed_norm) == (False, "mlm", "post", True)
    assert cfg.type_vocab_size == hf_cfg.type_vocab_size
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    offset = 2 if converted.family == "roberta" else 0  # RoBERTa: padding id 1, then position 0
    assert cfg.max_seq_len == hf_cfg.max_position_embeddings - offset


def test_masked_lm_logits_match_transformers(converted):
    tokens, mask, types = _batch(converted.model.config)
    want = _hf_logits(converted.model, tokens, mask, types)
    got = _jaxlm_logits(converted.config, converted.params, tokens, mask, types)
    assert np.abs(want).max() > 1.0
    atol = max(1e-4, 2e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(got[mask], want[mask], atol=atol, rtol=0)


def test_export_round_trips_every_tensor(converted, tmp_path):
    """HF -> jaxlm -> HF gives the same tensors (RoBERTa's unused rows before position 0 come
    back as zeros), and transformers loads the result with the same logits."""
    # A jaxlm encoder exports as BERT by default (the same function: RoBERTa's position table
    # minus its padding rows is BERT's); model_type keeps a RoBERTa a RoBERTa.
    model_type = converted.model.config.model_type
    hf.save_hf(tmp_path, converted.config, converted.params, model_type=model_type)
    before, after = SafetensorsDir(converted.hf_dir), SafetensorsDir(tmp_path)
    assert after.names() == before.names()
    untied = not converted.config.tie_embeddings
    for name in before.names():
        a, b = np.asarray(after.view(name)), np.asarray(before.view(name))
        if name.endswith("position_embeddings.weight") and converted.family == "roberta":
            np.testing.assert_array_equal(a[:2], 0.0)
            a, b = a[2:], b[2:]
        if untied and name == "cls.predictions.bias":
            # Unused by an untied BERT (its decoder has its own bias): written as that copy.
            b = np.asarray(before.view("cls.predictions.decoder.bias"))
        np.testing.assert_array_equal(a, b, err_msg=name)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(converted.model)
    tokens, mask, types = _batch(converted.model.config, seed=2)
    np.testing.assert_allclose(
        _hf_logits(reloaded, tokens, mask, types)[mask],
        _hf_logits(converted.model, tokens, mask, types)[mask],
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_a_jaxlm_encoder_exports_to_transformers(model_type, tmp_path):
    """jaxlm -> HF: a random jaxlm encoder, saved as `model_type`, loads in transformers and
    gives jaxlm's logits."""
    from jaxlm.configs import get_preset

    cfg = dataclasses.replace(
        get_preset("tiny"),
        vocab_size=hf_models.VOCAB,
        max_seq_len=24,
        scan_layers=True,
        causal=False,
        norm_position="post",
        embed_norm=True,
        type_vocab_size=2,
        head="mlm",
        activation="gelu",
    )
    params = random_params(cfg, seed=5)
    hf.save_hf(tmp_path, cfg, params, model_type=model_type)
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert model.config.model_type == model_type
    tokens, mask, types = _batch(model.config, seed=3)
    want = _hf_logits(model, tokens, mask, types)
    got = _jaxlm_logits(cfg, params, tokens, mask, types)
    np.testing.assert_allclose(got[mask], want[mask], atol=max(1e-4, 2e-5 * np.abs(want).max()))


def test_pretraining_checkpoint_imports_without_its_next_sentence_head(tmp_path):
    """bert-base-uncased is a BertForPreTraining checkpoint: pooler and next-sentence head are
    left out; the masked-LM logits are its prediction logits."""
    model = hf_models.build_encoder("bert", tmp_path, seed=7, cls="BertForPreTraining")
    names = SafetensorsDir(tmp_path).names()
    assert any("pooler" in n for n in names) and any("seq_relationship" in n for n in names)
    config = hf.load_model_config(tmp_path)
    params = hf.params_from_hf(tmp_path, config)
    tokens, mask, types = _batch(model.config, seed=4)
    want = _hf_logits(model, tokens, mask, types)
    got = _jaxlm_logits(config, params, tokens, mask, types)
    np.testing.assert_allclose(got[mask], want[mask], atol=max(1e-4, 2e-5 * np.abs(want).max()))


def test_an_encoder_classifier_and_a_relative_position_bert_are_refused(tmp_path):
    hf_models.build_encoder("bert", tmp_path, seed=1)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ValueError, match="imports bert masked-LM checkpoints"):
        hf.load_model_config(tmp_path)
    path.write_text(json.dumps(config | {"position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        hf.load_model_config(tmp_path)


def test_a_decoder_is_not_exported_as_bert(tmp_path):
    from jaxlm.configs import get_preset

    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match=r"not a Hugging Face 'bert' model: causal=True"):
        hf.save_hf(tmp_path, cfg, random_params(cfg), model_type="bert")


WORDS = ["def", "self", "return", "class", "import", "the", "value", "name", "for", "in"]


def _wordpiece(directory):
    """A BERT WordPiece tokenizer (lower-casing, [CLS] text [SEP]) saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list("abcdefghijklmnopqrstuvwxyz():=.,_")
    vocab = specials + WORDS + pieces + ["##" + c for c in pieces] + ["##ue", "##lf", "##me"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True}
    for name, token in zip(("pad", "unk", "cls", "sep", "mask"), specials, strict=True):
        config[f"{name}_token"] = token
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _byte_bpe(directory):
    """A RoBERTa-style byte-level BPE with <s> </s> <pad> <mask>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "mask_token": "<mask>"}
    config |= {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tokenizer_from_the_model_directory_matches_transformers(family, tmp_path):
    """The directory's WordPiece / byte-level BPE tokenizer: jaxlm's [CLS]/<s> + encode +
    [SEP]/</s> are transformers' input ids, and the mask id is its mask_token_id; the workdir
    that import writes keeps it, and an export writes it back for transformers."""
    hf_models.build_encoder(family, tmp_path / "hf", seed=2)
    (_wordpiece if family == "bert" else _byte_bpe)(tmp_path / "hf")
    want = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def name(self): return self.value for the class"
    tok = hf.load_hf_tokenizer(tmp_path / "hf")
    assert [tok.bos_id, *tok.encode(text), tok.eos_id] == want(text)["input_ids"]
    assert (tok.mask_id, tok.pad_id) == (want.mask_token_id, want.pad_token_id)

    from jaxlm.run import load_for_eval

    hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
    _, _, _, loaded = load_for_eval(tmp_path / "run")
    assert (loaded.mask_id, loaded.encode(text)) == (tok.mask_id, tok.encode(text))
    hf.export_checkpoint(tmp_path / "run", tmp_path / "out", model_type=family)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again(text)["input_ids"] == want(text)["input_ids"]
    assert again.mask_token_id == want.mask_token_id


# --- fill-mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_fill_mask_matches_the_transformers_pipeline(family, tmp_path, capsys):
    """`fill_mask` and `jaxlm sample --fill-mask` on an imported encoder give the top-k token ids
    and probabilities of transformers' fill-mask pipeline, for one mask and for two."""
    from jaxlm import cli
    from jaxlm.encode import fill_mask
    from jaxlm.run import load_for_eval

    model = hf_models.build_encoder(family, tmp_path / "hf", seed=3)
    (_wordpiece if family == "bert" else _byte_bpe)(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    pipe = transformers.pipeline("fill-mask", model=model, tokenizer=hf_tok, top_k=4)
    m = hf_tok.mask_token
    texts = [f"def {m}(self): return self.value", f"the {m} for {m} class"]
    hf.import_checkpoint(tmp_path / "hf", tmp_path / "run")
    config, _, params, tok = load_for_eval(tmp_path / "run")
    answers = fill_mask(config.model, params, tok, texts, top_k=4)
    for text, answer in zip(texts, answers, strict=True):
        want = pipe(text)
        want = [want] if text.count(m) == 1 else want
        assert len(answer.fillers) == text.count(m)
        for cands, ref in zip(answer.fillers, want, strict=True):
            assert [c.token_id for c in cands] == [r["token"] for r in ref]
            probs = [c.prob for c in cands]
            np.testing.assert_allclose(probs, [r["score"] for r in ref], atol=1e-5)
    # The whole text with the top filler, as the pipeline writes it for a single mask.
    assert answers[0].filled.replace(" ", "") == pipe(texts[0])[0]["sequence"].replace(" ", "")

    assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--fill-mask", texts[1]]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = fill_mask(config.model, params, tok, texts[1], top_k=5)
    assert [[c["id"] for c in mask] for mask in line["masks"]] == [
        [c.token_id for c in cands] for cands in ref.fillers
    ]
    assert line["filled"] == ref.filled

    # Bad input: no mask in the text, a bad --top-k.
    assert cli.main(["sample", "--workdir", str(tmp_path / "run"), "--fill-mask", "no mask"]) == 2
    assert f"'no mask' has no mask token: write {m!r}" in capsys.readouterr().err
    bad_k = ["sample", "--workdir", str(tmp_path / "run"), "--fill-mask", texts[0], "--top-k", "0"]
    assert cli.main(bad_k) == 2
    assert "--top-k 0 must be >= 1" in capsys.readouterr().err


def test_fill_mask_refuses_a_causal_model_and_a_tokenizer_without_a_mask(tmp_path):
    from jaxlm.configs.presets import get_preset
    from jaxlm.data import ByteTokenizer, HFTokenizer
    from jaxlm.encode import fill_mask

    encoder = get_preset("tiny-bert")
    causal = dataclasses.replace(encoder, causal=True)
    with pytest.raises(ValueError, match=r"bidirectional masked-LM model, but model\.causal=True"):
        fill_mask(causal, {}, ByteTokenizer(), "def [MASK](self):")
    (tmp_path / "a.txt").write_text("def name(self): return self.value\n" * 200)
    bpe = HFTokenizer.train_bpe([tmp_path / "a.txt"], 300)
    with pytest.raises(ValueError, match=r"has no mask token \(\[MASK\], <mask>\)"):
        fill_mask(encoder, {}, bpe, "def [MASK](self):")
    with pytest.raises(ValueError, match=r"top_k=0 must be an integer in \[1, "):
        fill_mask(encoder, {}, ByteTokenizer(), "def [MASK](self):", top_k=0)
