"""Typed dotted overrides and config loading."""

import json

import pytest

from jaxlm.configs import RunConfig, get_preset
from jaxlm.configs.overrides import apply_overrides, from_dict, load_config, to_dict


def test_overrides_convert_to_each_field_type():
    cfg = load_config(
        "tiny",
        [
            "model.num_layers=3",
            "model.rope_theta=5e5",
            "model.qk_norm=true",
            "model.activation=swiglu",
            "model.sliding_window=16",
            "model.attn_logit_softcap=50",
            "mesh.fsdp=4",
            "mesh.rules=fsdp_tp",
            "seed=7",
        ],
    )
    m = cfg.model
    assert (m.num_layers, m.rope_theta, m.qk_norm, m.activation) == (3, 5e5, True, "swiglu")
    assert (m.sliding_window, m.attn_logit_softcap) == (16, 50.0)
    assert isinstance(m.attn_logit_softcap, float)
    assert (cfg.mesh.fsdp, cfg.mesh.rules, cfg.seed) == (4, "fsdp_tp", 7)
    assert (
        load_config(
            "tiny", ["model.sliding_window=16", "model.sliding_window=none"]
        ).model.sliding_window
        is None
    )


def test_overriding_width_rederives_what_was_derived():
    cfg = apply_overrides(RunConfig(), ["model.d_model=128", "model.num_heads=8"])
    assert (cfg.model.head_dim, cfg.model.mlp_dim, cfg.model.num_kv_heads) == (16, 512, 8)
    # An explicit value is kept.
    cfg = apply_overrides(RunConfig(), ["model.head_dim=32", "model.d_model=128"])
    assert cfg.model.head_dim == 32


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=3", r"unknown config key 'model.d_modle'. Did you mean model.d_model"),
        (
            "modl.num_layers=3",
            r"unknown config key 'modl.num_layers'. Did you mean model.num_layers",
        ),
        ("model.num_layers=two", r"model.num_layers='two': expected an int"),
        ("model.qk_norm=maybe", r"model.qk_norm='maybe': expected a bool"),
        ("model.norm=batch", r"model.norm='batch': expected one of 'layernorm', 'rmsnorm'"),
        ("model.rope_theta=fast", r"model.rope_theta='fast': expected a float"),
        ("model.sliding_window=wide", r"model.sliding_window='wide': expected int or None"),
        ("model=tiny", r"model is a section; set one of its fields"),
        (
            "model.num_kv_heads=3",
            r"model.num_kv_heads='3': ModelConfig.num_heads=4 must be divisible",
        ),
        ("no_equals_sign", r"override 'no_equals_sign' must look like key.path=value"),
    ],
)
def test_bad_overrides_are_refused_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_load_config_from_python_and_json_files(tmp_path):
    py = tmp_path / "exp.py"
    py.write_text(
        "from jaxlm.configs import RunConfig, get_preset\n"
        "import dataclasses\n"
        "def get_config():\n"
        "    model = dataclasses.replace(get_preset('tiny'), num_layers=3)\n"
        "    return RunConfig(model=model, seed=3)\n"
    )
    cfg = load_config(str(py), ["model.d_model=32"])
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.seed) == (3, 32, 3)
    js = tmp_path / "run.json"
    js.write_text(json.dumps(to_dict(cfg)))
    assert load_config(str(js)) == cfg


def test_from_dict_refuses_unknown_and_mistyped_fields():
    data = to_dict(RunConfig(model=get_preset("tiny")))
    data["model"]["num_layrs"] = 3
    with pytest.raises(ValueError, match=r"unknown config key 'model.num_layrs'"):
        from_dict(RunConfig, data)
    data = to_dict(RunConfig())
    data["model"]["d_model"] = "wide"
    with pytest.raises(ValueError, match=r"model.d_model='wide': expected an int"):
        from_dict(RunConfig, data)


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
