"""muP: equal to SP at the base width; the init and learning-rate multipliers measured on real
init draws and real AdamW steps (scanned MoE, sharded); the coordinate check; bad input."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxlm import cli, loop
from jaxlm.configs import get_preset
from jaxlm.configs.model import ModelConfig
from jaxlm.configs.overrides import apply_overrides, from_dict, load_config, to_dict
from jaxlm.configs.run import RunConfig
from jaxlm.data import ByteTokenizer
from jaxlm.interop.hf import save_hf
from jaxlm.model import mup
from jaxlm.model.transformer import Transformer, init_params
from jaxlm.run import check_run, init_train_state, load_for_eval, make_train_step
from jaxlm.scaling.coordinates import _batch, coord_check, coord_growth
from jaxlm.sharding import make_mesh
from jaxlm.step import train_step

SMALL = [
    "data.seq_len=16",
    "data.batch_size=8",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "optim.clip_norm=None",
    "optim.learning_rate=0.01",
    "train.steps=4",
]


def _leaves(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_mup_at_its_base_width_is_sp_bitwise():
    sp = load_config("tiny-llama", SMALL)
    at_base = apply_overrides(sp, ["model.parametrization=mup", "model.mup_base_width=64"])
    assert mup.lr_multipliers(at_base.model) == {}  # every multiplier is 1 at m = 1
    states = []
    for cfg in (sp, at_base):
        state = init_train_state(cfg, make_mesh(cfg.mesh), 0)
        step = jax.jit(functools.partial(train_step, config=cfg))
        state, metrics = step(state, _batch(cfg, 0))
        states.append((_leaves(state.params), float(metrics["loss"])))
    (a, loss_a), (b, loss_b) = states
    assert loss_a == loss_b
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _moe(parametrization, d_model, lora=0):
    return apply_overrides(
        load_config("tiny-moe", SMALL),
        [
            f"model.parametrization={parametrization}",
            "model.mup_base_width=32",
            f"model.d_model={d_model}",
            "model.moe.num_shared_experts=1",
            "model.moe.shared_expert_gate=True",
            f"model.lora.rank={lora}",
            "model.lora.targets=query,experts",
            "mesh.fsdp=8",
            "mesh.rules=fsdp",
        ],
    )


# Width 128 over base 32: m = 4. What Tensor Programs V prescribes for Adam, by weight.
HIDDEN = (
    "attn']['query",
    "attn']['out",
    "moe']['up'",
    "moe']['down'",
    "shared']['up",
    "shared']['down",
)
READOUT = ("router", "shared_gate")
FIXED = ("embed']['embedding", "unembed", "attn_norm", "final_norm")


def _kind(name):
    for kind, parts in (("hidden", HIDDEN), ("readout", READOUT), ("fixed", FIXED)):
        if any(p in name for p in parts):
            return kind
    return None


def test_init_stds_against_sp_at_the_same_width():
    got = _leaves(init_params(_moe("mup", 128).model, jax.random.key(1)))
    ref = _leaves(init_params(_moe("sp", 128).model, jax.random.key(2)))
    want = {"hidden": 0.5, "readout": 0.25, "fixed": 1.0}  # m^-1/2, 1/m, 1
    seen = set()
    for name, x in got.items():
        kind = _kind(name)
        if kind is None or x.ndim < 2 or not np.std(ref[name]):
            continue
        seen.add(kind)
        ratio = np.std(x) / np.std(ref[name])
        assert ratio == pytest.approx(want[kind], rel=0.15), (name, ratio)
    assert seen == {"hidden", "readout", "fixed"}


def test_first_adamw_step_moves_each_weight_by_its_learning_rate_multiplier():
    """Adam's first update is lr * g / (|g| + eps): +-lr wherever the gradient is not ~0. Under
    muP hidden and readout weights move by lr / m, the rest by lr; scanned layers, MoE experts
    and an 8-way fsdp mesh included."""
    cfg = _moe("mup", 128)
    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, 0)
    before = _leaves(state.params)
    state, _ = make_train_step(cfg, mesh)(state, _batch(cfg, 0))
    lr, want = 0.01, {"hidden": 0.25, "readout": 0.25, "fixed": 1.0}
    seen = set()
    for name, after in _leaves(state.params).items():
        kind = _kind(name)
        if kind is None:
            continue
        seen.add(kind)
        moved = np.abs(after - before[name]).max()
        assert moved == pytest.approx(lr * want[kind], rel=1e-3), (name, moved)
    assert seen == {"hidden", "readout", "fixed"}


def test_lora_on_a_mup_model_trains_adapters_at_the_plain_rate():
    cfg = _moe("mup", 128, lora=2)
    assert not [n for n in mup.lr_multipliers(cfg.model) if "lora" in n]
    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, 0)
    before = _leaves(state.params)
    state, _ = make_train_step(cfg, mesh)(state, _batch(cfg, 0))
    for name, after in _leaves(state.params).items():
        moved = np.abs(after - before[name]).max()
        if "lora_b" in name:  # B starts at zero: its first step is +-lr
            assert moved == pytest.approx(0.01, rel=1e-3), name
        elif "lora" not in name:
            assert moved == 0, name  # the base is frozen


def test_coordinate_check_flat_under_mup_growing_under_sp():
    base = apply_overrides(
        RunConfig(),
        [
            *SMALL,
            "model.num_layers=2",
            "model.num_heads=4",
            "model.vocab_size=128",
            "model.max_seq_len=16",
            "model.mup_base_width=32",
            "train.steps=10",
        ],
    )
    result = {}
    for p in ("sp", "mup"):
        rows = coord_check(apply_overrides(base, [f"model.parametrization={p}"]), [32, 256])
        result[p] = coord_growth(rows, "update"), coord_growth(rows, "size")
    (sp_update, sp_size), (mup_update, mup_size) = result["sp"], result["mup"]
    # 8x the width: under SP, with Adam, every block's change and the logits grow with it ...
    for layer in ("block_0", "block_1", "logits"):
        assert sp_update[layer] > 3 and sp_size[layer] > 3, (layer, sp_update, sp_size)
    # ... under muP every layer's coordinates and their change stay within 2x.
    for layer, g in {**mup_update, **{f"{k} size": v for k, v in mup_size.items()}}.items():
        assert 0.5 <= g <= 2.0, (layer, mup_update, mup_size)


def test_config_round_trips_and_info_names_the_multipliers(capsys):
    cfg = load_config("tiny", ["model.parametrization=mup", "model.mup_base_width=16"])
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert cli.main(["info", "--config", "tiny", "--set", "model.parametrization=mup",
                     "--set", "model.mup_base_width=16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "width ratio m = 4" in out
    assert "attention scale sqrt(4)/16 = 0.125" in out
    assert "output logits x 0.25" in out
    assert "hidden: init std x 0.5, learning rate x 0.25: attn/key, attn/out" in out


def test_bad_input_is_refused_with_the_value():
    with pytest.raises(ValueError, match="parametrization='mu' is not valid"):
        ModelConfig(parametrization="mu")
    with pytest.raises(
        ValueError, match=r"mup_base_width=128 must be an integer in \[1, d_model=64\]"
    ):
        ModelConfig(d_model=64, parametrization="mup", mup_base_width=128)
    with pytest.raises(
        ValueError, match=r"mup_base_head_dim=32 must be an integer in \[1, head_dim=16\]"
    ):
        ModelConfig(d_model=64, parametrization="mup", mup_base_head_dim=32)
    cfg = load_config("tiny", ["model.parametrization=mup", "optim.name=adafactor"])
    with pytest.raises(ValueError, match=r"not optim\.name='adafactor'"):
        check_run(cfg, ByteTokenizer(), data=False)


def test_hf_export_refuses_a_widened_mup_model(tmp_path):
    model = dataclasses.replace(get_preset("tiny"), parametrization="mup", mup_base_width=32)
    params = init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"multiplies its logits by 0\.5"):
        save_hf(tmp_path / "out", model, params)
    assert not (tmp_path / "out").exists()
    base = dataclasses.replace(model, mup_base_width=64)  # at its base width: plain SP
    assert (save_hf(tmp_path / "ok", base, params) / "config.json").exists()


def test_a_mup_run_resumes_bitwise_and_evaluates_with_its_scales(tmp_path):
    cfg = _moe("mup", 128)
    cfg = apply_overrides(
        cfg,
        [
            "train.steps=6",
            "train.eval_batches=1",
            "train.sample_tokens=0",
            "checkpoint.every=3",
        ],
    )
    whole = loop.train(cfg, tmp_path / "whole")["state"]
    loop.train(apply_overrides(cfg, ["train.steps=3"]), tmp_path / "cut")
    resumed = loop.train(cfg, tmp_path / "cut")["state"]
    a, b = _leaves(whole.params), _leaves(resumed.params)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # What is restored for evaluation is the muP model: its config, and the logits it gives.
    run, _, params, _ = load_for_eval(tmp_path / "cut")
    assert (run.model.parametrization, run.model.mup_base_width) == ("mup", 32)
    tokens = _batch(cfg, 0)["tokens"]
    want = Transformer(cfg.model).apply({"params": whole.params}, tokens)[0]
    got = Transformer(run.model).apply({"params": params}, tokens)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
