"""The one run setup: the plan matches what init and the data make, frozen parameters stay
frozen, `init_from` starts a new run from another one's weights, and the package's face."""

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm import checkpoint, loop
from jaxlm.configs.overrides import load_config
from jaxlm.data import HFTokenizer, to_global
from jaxlm.run import RunPlan, check_init_source, load_for_eval, state_from_source
from jaxlm.tasks import LMTask, merge, param_names, partition


def _config(*overrides):
    return load_config(
        "tiny",
        [
            "data.seq_len=32",
            "data.batch_size=8",
            "train.steps=4",
            "train.eval_every=1000",
            "train.eval_batches=1",
            "train.log_every=1",
            "train.sample_tokens=0",
            "train.peak_flops_per_device=1e11",
            "checkpoint.every=2",
            *overrides,
        ],
    )


def test_no_public_name_shadows_a_submodule():
    # `from jaxlm.loop import train` once hid the module `jaxlm.train`; keep names and modules
    # apart, so `import jaxlm.x as m` always gives the module.
    for info in pkgutil.iter_modules(jaxlm.__path__):
        if info.name.startswith("_"):  # __main__ runs the CLI
            continue
        module = importlib.import_module(f"jaxlm.{info.name}")
        assert getattr(jaxlm, info.name) is module, info.name
    assert callable(jaxlm.train) and "train" not in {
        m.name for m in pkgutil.iter_modules(jaxlm.__path__)
    }
    for name in jaxlm.__all__:
        assert getattr(jaxlm, name) is not None


def test_one_load_config():
    # One public `load_config` (a RunConfig from a preset or file); HF's reads a ModelConfig.
    from jaxlm.interop import hf

    assert not hasattr(hf, "load_config") and callable(hf.load_model_config)
    assert jaxlm.load_config("tiny") == load_config("tiny")


def test_plan_matches_the_initialised_state_and_the_data(stdlib_cache):
    cfg = _config("mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp")
    plan = RunPlan(cfg)
    state = plan.init_state()
    for abstract, real in zip(
        jax.tree.leaves(plan.abstract_state), jax.tree.leaves(state), strict=True
    ):
        assert (abstract.shape, abstract.dtype) == (real.shape, real.dtype)
        assert abstract.sharding.is_equivalent_to(real.sharding, real.ndim)
    it = plan.make_iterator()
    batch = to_global(next(it), plan.mesh, it.rows, it.global_batch)
    spec = plan.abstract_batch()
    assert set(batch) == set(spec)
    for k, v in batch.items():
        assert (v.shape, v.dtype) == (spec[k].shape, spec[k].dtype), k
        assert v.sharding.is_equivalent_to(spec[k].sharding, v.ndim), k
    assert plan.checkpoint_bytes() == checkpoint.state_bytes(state)


def test_partition_and_merge_are_inverse():
    params = {"a": {"x": 1, "y": {"z": 2}}, "b": 3}
    train, frozen = partition(params, lambda n: n.startswith("a/y") or n == "b")
    assert train == {"a": {"y": {"z": 2}}, "b": 3} and frozen == {"a": {"x": 1}}
    assert merge(train, frozen) == params
    assert param_names(params) == ["a/x", "a/y/z", "b"]


class _MLPOnly(LMTask):
    """Trains only the MLP weights (the mechanism LoRA and prompt tuning build on)."""

    def trainable(self, name):
        return "/mlp/" in name


def test_frozen_parameters_get_no_update_and_no_optimizer_state(stdlib_cache, monkeypatch):
    # AdamW without clipping and weight decay moves each weight by a function of its own
    # gradient only, so after one step the trained leaves must equal those of a full step.
    cfg = _config("optim.clip_norm=none", "optim.weight_decay=0", "optim.warmup_steps=0")
    full = RunPlan(cfg)
    monkeypatch.setitem(jaxlm.tasks.TASKS, "lm", _MLPOnly)
    part = RunPlan(cfg)
    assert part.trainable_names() and all("/mlp/" in n for n in part.trainable_names())
    it = full.make_iterator()
    batch = to_global(next(it), full.mesh, it.rows, it.global_batch)
    start = jax.device_get(full.init_state().params)
    after_full, _ = full.train_step(full.init_state(), batch)
    after_part, metrics = part.train_step(part.init_state(), batch)
    assert float(metrics["loss"]) > 0
    for name, a, b, s in zip(
        param_names(start),
        jax.tree.leaves(jax.device_get(after_full.params)),
        jax.tree.leaves(jax.device_get(after_part.params)),
        jax.tree.leaves(start),
        strict=True,
    ):
        if "/mlp/" in name:
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=name)
            assert not np.array_equal(b, s), name
        else:
            np.testing.assert_array_equal(b, s, err_msg=name)  # bitwise unchanged
    names = param_names(start)
    trained = sum(
        x.size for n, x in zip(names, jax.tree.leaves(start), strict=True) if "/mlp/" in n
    )
    moments = sum(x.size for x in jax.tree.leaves(after_part.opt_state) if x.ndim)
    assert moments == 2 * trained  # Adam's two moments of the MLP weights only


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLM_CACHE", str(cache))
    workdir = tmp_path_factory.mktemp("base") / "run"
    loop.train(_config("train.steps=30", "optim.warmup_steps=5", "checkpoint.every=15"), workdir)
    yield workdir
    mp.undo()


def test_init_from_starts_from_the_runs_weights_with_a_fresh_optimizer(base_run, tmp_path):
    _, _, want, _ = load_for_eval(base_run)
    cfg = _config("model.param_dtype=bfloat16", "optim.learning_rate=1e-3")
    plan = RunPlan(cfg)
    state = state_from_source(plan, check_init_source(plan, base_run))
    assert int(state.step) == 0
    shardings = jax.tree.leaves(plan.state_shardings.params)
    for a, b, s in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(want), shardings, strict=True
    ):
        assert a.dtype == jnp.bfloat16 and a.sharding.is_equivalent_to(s, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state) if x.ndim)


def test_init_from_trains_then_resumes_its_own_checkpoints(base_run, tmp_path):
    fresh = loop.train(_config("train.steps=2"), tmp_path / "fresh")
    first = loop.train(_config("train.steps=2"), tmp_path / "stage2", init_from=base_run)
    # The base run's weights are better than a fresh init on the same first batch.
    assert first["history"][0]["loss"] < fresh["history"][0]["loss"] - 0.3
    saved = checkpoint.load_run_config(tmp_path / "stage2")
    assert saved.train.init_from == str(base_run)
    resumed = loop.train(
        dataclasses.replace(saved, train=dataclasses.replace(saved.train, steps=4)),
        tmp_path / "stage2",
    )
    assert [h["step"] for h in resumed["history"]] == [3, 4]  # resumed at 2, not re-initialised


def test_init_from_refuses_what_cannot_be_a_starting_point(base_run, tmp_path):
    plan = RunPlan(_config())
    with pytest.raises(FileNotFoundError, match="not a jaxlm run directory"):
        check_init_source(plan, tmp_path)
    with pytest.raises(ValueError, match=r"init_from_step=3: no such checkpoint; steps: \[15, 30"):
        check_init_source(plan, base_run, 3)
    other = RunPlan(_config("model.d_model=48"))
    with pytest.raises(
        ValueError, match=r"another architecture.*model\.d_model: 64 there, 48 here"
    ):
        check_init_source(other, base_run)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    HFTokenizer.train_bpe([str(text)], 280).save(tmp_path / "tok")
    bpe = RunPlan(_config(f"data.tokenizer={tmp_path / 'tok'}"))
    with pytest.raises(ValueError, match="another tokenizer"):
        check_init_source(bpe, base_run)
    # Nothing is written before the check: the new workdir stays absent.
    with pytest.raises(ValueError, match="another architecture"):
        loop.train(_config("model.num_layers=3"), tmp_path / "new", init_from=base_run)
    assert not (tmp_path / "new").exists()


def test_cli_init_from_takes_the_source_runs_config(base_run, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm",
            "train",
            "--init-from",
            str(base_run),
            "--set",
            "train.steps=1",
            "--workdir",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "starting from the parameters of" in out.stderr
    saved = checkpoint.load_run_config(tmp_path / "b")
    assert saved.model == _config().model and saved.train.steps == 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm",
            "train",
            "--init-from",
            str(tmp_path),
            "--workdir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--init-from" in bad.stderr and "not a jaxlm run" in bad.stderr


def test_an_sft_lora_run_resumes_bitwise(tmp_path, stdlib_cache):
    records = [
        json.dumps({"prompt": f"add {a} and {b}", "completion": str(a + b)})
        for a in range(20)
        for b in range(5)
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(records) + "\n")
    overrides = [
        "task.kind=sft",
        f"data.dataset={tmp_path / 'chat.jsonl'}",
        "model.lora.rank=4",
        "model.lora.dropout=0.1",
        "model.lora.targets=query,value,up",
        "checkpoint.async_save=false",
        "data.seq_len=64",
    ]
    whole = loop.train(_config(*overrides), tmp_path / "whole")
    loop.train(_config(*overrides, "train.steps=2"), tmp_path / "split")
    resumed = loop.train(_config(*overrides), tmp_path / "split")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"][2:]]
    for a, b in zip(
        jax.tree.leaves(jax.device_get(whole["state"])),
        jax.tree.leaves(jax.device_get(resumed["state"])),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
