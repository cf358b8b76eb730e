"""Bad Hugging Face directories fail before anything is placed, naming what is wrong; odd but
valid layouts (sharded files, GPT-2 without its prefix, a duplicated tied output) import."""

import json
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file

from jaxlm.interop import hf
from tests.interop import hf_models


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Tiny saved models to copy and damage: {family: directory}."""
    out = {}
    for family in ("llama3", "qwen2", "gpt2"):
        out[family] = tmp_path_factory.mktemp(family)
        hf_models.build(family, out[family])
    return out


@pytest.fixture
def copy(originals, tmp_path):
    def make(family):
        target = tmp_path / family
        shutil.copytree(originals[family], target)
        return target

    return make


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_model_type_lists_the_supported_ones(copy):
    directory = copy("llama3")
    _edit_config(directory, model_type="t5")
    with pytest.raises(ValueError, match=r"model_type='t5'.*supported: \['bert', 'gpt2', 'llama'"):
        hf.load_model_config(directory)


def test_pickle_only_directory_is_refused(tmp_path, copy):
    directory = copy("llama3")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles.*safetensors"):
        hf.params_from_hf(directory)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        hf.load_model_config(tmp_path)


def test_missing_tensor_is_named(copy):
    directory = copy("llama3")
    _edit_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.params_from_hf(directory)


def test_unexpected_tensor_is_named(copy):
    directory = copy("llama3")
    extra = np.zeros((4,), np.float32)
    _edit_tensors(directory, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": extra}))
    with pytest.raises(
        ValueError, match=r"does not use.*model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        hf.params_from_hf(directory)


def test_shape_mismatch_names_tensor_expected_and_found(copy):
    directory = copy("llama3")
    _edit_config(directory, intermediate_size=100)
    with pytest.raises(
        ValueError, match=r"mlp\.down_proj\.weight \(expected \[64, 100\], found \[64, 96\]\)"
    ):
        hf.params_from_hf(directory)


@pytest.mark.parametrize(
    ("family", "changes", "field"),
    [
        ("llama3", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ("llama3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
            "layer_types",
        ),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unrepresentable_config_names_the_field(copy, family, changes, field):
    directory = copy(family)
    _edit_config(directory, **changes)
    if family == "qwen2":  # let max_window_layers decide which layers slide
        config = json.loads((directory / "config.json").read_text())
        config.pop("layer_types")
        (directory / "config.json").write_text(json.dumps(config))
        field = "max_window_layers"
    with pytest.raises(ValueError, match=field):
        hf.load_model_config(directory)


def test_moe_layer_pattern_jaxlm_cannot_represent_is_refused(tmp_path):
    hf_models.build("qwen2_moe", tmp_path)
    _edit_config(tmp_path, mlp_only_layers=[1])  # MoE at layers 0 and 2: no k-th pattern
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*MoE layers \[0, 2\]"):
        hf.load_model_config(tmp_path)


def test_tied_output_copy_is_accepted_but_a_different_one_is_refused(copy):
    directory = copy("qwen2")  # tied
    want = hf.params_from_hf(directory)
    tensors = load_file(directory / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    _edit_tensors(directory, lambda t: t.update({"lm_head.weight": embed.copy()}))
    jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(directory), want)
    _edit_tensors(directory, lambda t: t.update({"lm_head.weight": embed + 1}))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from the embedding"):
        hf.params_from_hf(directory)


def test_gpt2_without_prefix_and_with_mask_buffers_imports(copy):
    """The original GPT-2 files: no "transformer." prefix, causal-mask buffers stored."""
    directory = copy("gpt2")
    want = hf.params_from_hf(directory)

    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)

    _edit_tensors(directory, strip)
    jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(directory), want)


def test_sharded_checkpoint_with_index_imports(copy):
    directory = copy("llama3")
    want = hf.params_from_hf(directory)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(directory), want)


def test_bfloat16_checkpoint_keeps_its_dtype_unless_overridden(tmp_path):
    import torch

    model = hf_models.build("llama3", tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = hf.load_model_config(tmp_path / "bf16")
    assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    params = hf.params_from_hf(tmp_path / "bf16")
    embed = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), embed)
    as_f32 = hf.params_from_hf(tmp_path / "bf16", dtype="float32")
    assert as_f32["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(as_f32["embed"]["embedding"], embed)
