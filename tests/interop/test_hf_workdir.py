"""Imported workdirs work with sample/eval/train unchanged; exports load in transformers; a
sharded import equals a single-device one."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import checkpoint, loop, storage  # noqa: E402
from jaxlm.configs import get_preset  # noqa: E402
from jaxlm.configs.model import MoEConfig  # noqa: E402
from jaxlm.configs.run import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    RunConfig,
    TrainConfig,
)
from jaxlm.data import HFTokenizer  # noqa: E402
from jaxlm.interop import hf, safetensors_io  # noqa: E402
from jaxlm.model.transformer import Transformer, param_shardings  # noqa: E402
from jaxlm.run import load_for_eval  # noqa: E402
from jaxlm.sharding import make_mesh  # noqa: E402
from tests.interop import hf_models  # noqa: E402
from tests.random_params import random_params  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


def _logits(config, params, tokens):
    apply = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t)[0])
    return np.asarray(apply(params, jnp.asarray(tokens, jnp.int32)))


def _hf_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama 3 with a byte-level BPE tokenizer.json of its own."""
    directory = tmp_path_factory.mktemp("llama3")
    hf_models.build("llama3", directory)
    corpus = directory.parent / "corpus.txt"
    corpus.write_text(TEXT)
    tokenizer = HFTokenizer.train_bpe([corpus], vocab_size=300)
    tokenizer.save(directory.parent / "tok")
    (directory / "tokenizer.json").write_bytes(
        (directory.parent / "tok/tokenizer.json").read_bytes()
    )
    return directory


@pytest.fixture(scope="module")
def workdir(llama_dir, tmp_path_factory, _session_cache):
    """The Llama imported as a workdir set up for a 2-step fine-tune on the stdlib corpus."""
    run = RunConfig(
        data=DataConfig(seq_len=32, batch_size=8),
        train=TrainConfig(steps=2, eval_every=2, eval_batches=1, sample_tokens=0, log_every=1),
        checkpoint=CheckpointConfig(every=2, async_save=False),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        yield hf.import_checkpoint(
            llama_dir, tmp_path_factory.mktemp("work") / "run", run_config=run
        )


def test_imported_workdir_holds_the_model_and_tokenizer(llama_dir, workdir):
    assert checkpoint.complete_steps(workdir) == [0]
    run, _, params, tokenizer = load_for_eval(workdir)
    assert run.model == hf.load_model_config(llama_dir)
    assert run.data.tokenizer == str(workdir / "tokenizer")
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.encode("def x") == (
        HFTokenizer.load(llama_dir / "tokenizer.json").encode("def x")
    )
    want = hf.params_from_hf(llama_dir)
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_sample_and_eval_run_on_the_imported_workdir(workdir, stdlib_cache):
    """`jaxlm sample` (as a user runs it) and evaluation read the imported checkpoint."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ["sample", "--workdir", str(workdir), "--prompt", "def ", "--max-new-tokens", "8"]
    out = subprocess.run(
        [sys.executable, "-m", "jaxlm", *args, "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ")
    result = loop.eval_workdir(workdir, max_batches=1)
    assert np.isfinite(result["eval_loss"]) and result["eval_tokens"] > 0


def test_fine_tuning_resumes_from_the_imported_step(workdir, tmp_path, stdlib_cache):
    import shutil

    run_dir = tmp_path / "finetune"
    shutil.copytree(workdir, run_dir)
    before = load_for_eval(run_dir)[2]
    result = loop.train(checkpoint.load_run_config(run_dir), run_dir)
    assert result["step"] == 2 and checkpoint.complete_steps(run_dir) == [0, 2]
    assert [h["step"] for h in result["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in result["history"])
    after = load_for_eval(run_dir)[2]
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(changed))


def test_export_checkpoint_loads_in_transformers(workdir, tmp_path):
    out = hf.export_checkpoint(workdir, tmp_path / "hf")
    run, _, params, tokenizer = load_for_eval(workdir)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 10))
    np.testing.assert_allclose(
        _hf_logits(out, tokens), _logits(run.model, params, tokens), atol=1e-4, rtol=0
    )
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.encode("class Point:") == tokenizer.encode("class Point:")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["eos_token_id"] == tokenizer.eos_id


def test_import_from_a_bucket_and_export_to_one_equal_disk(
    llama_dir, workdir, gcs_bucket, tmp_path, stdlib_cache
):
    """HF model directories and jaxlm runs in Cloud Storage (the emulator): a model imported from
    the bucket into a bucket run equals the one imported on disk; its export into the bucket
    holds the same tensors as the export on disk and loads in transformers once copied down."""
    storage.upload_dir(llama_dir, storage.as_path(f"{gcs_bucket}/llama"))
    run = checkpoint.load_run_config(workdir)
    bucket_run = f"{gcs_bucket}/run"
    hf.import_checkpoint(f"{gcs_bucket}/llama", bucket_run, run_config=run)
    assert checkpoint.complete_steps(bucket_run) == [0]
    got, want = load_for_eval(bucket_run), load_for_eval(workdir)
    assert got[0].model == want[0].model
    jax.tree.map(np.testing.assert_array_equal, got[2], want[2])
    assert got[3].encode("class Point:") == want[3].encode("class Point:")

    hf.export_checkpoint(bucket_run, f"{gcs_bucket}/export")
    on_disk = hf.export_checkpoint(workdir, tmp_path / "disk")
    in_bucket = safetensors_io.SafetensorsDir(f"{gcs_bucket}/export")
    expected = safetensors_io.SafetensorsDir(on_disk)
    assert in_bucket.names() == expected.names()
    for name in expected.names():
        np.testing.assert_array_equal(in_bucket.view(name), expected.view(name))
    local = storage.local_copy(f"{gcs_bucket}/export")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in on_disk.iterdir())
    tokens = np.random.default_rng(1).integers(0, 300, (1, 8))
    np.testing.assert_array_equal(_hf_logits(local, tokens), _hf_logits(on_disk, tokens))


def test_import_refuses_a_workdir_that_holds_a_run(llama_dir, workdir):
    with pytest.raises(ValueError, match="already holds a jaxlm run"):
        hf.import_checkpoint(llama_dir, workdir)


NATIVE = {
    "gpt2": dataclasses.replace(get_preset("tiny"), max_seq_len=32),
    "llama_geglu_window": dataclasses.replace(
        get_preset("tiny-llama"), activation="geglu", sliding_window=5, scan_layers=False
    ),
    "qwen3_tied": dataclasses.replace(get_preset("tiny-llama"), qk_norm=True, tie_embeddings=True),
    "mixtral": get_preset("tiny-moe"),
    "qwen2_moe_sparse": dataclasses.replace(
        get_preset("tiny-moe"),
        num_layers=4,
        attn_bias=True,
        attn_out_bias=False,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_mlp_dim=32,
            num_shared_experts=2,
            shared_expert_gate=True,
            renormalize=False,
            every=2,
        ),
    ),
}
EXPECTED_TYPE = {
    "gpt2": "gpt2",
    "llama_geglu_window": "mistral",
    "qwen3_tied": "qwen3",
    "mixtral": "mixtral",
    "qwen2_moe_sparse": "qwen2_moe",
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_models_export_to_transformers(name, tmp_path):
    """A jaxlm model (random weights, norm scales and biases) exported to HF gives jaxlm's
    logits in transformers."""
    config = NATIVE[name]
    params = random_params(config, seed=1)
    hf.save_hf(tmp_path, config, params)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == EXPECTED_TYPE[name]
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    np.testing.assert_allclose(
        _hf_logits(tmp_path, tokens), _logits(config, params, tokens), atol=1e-4, rtol=0
    )


def test_export_in_bfloat16_and_shards(tmp_path):
    config = get_preset("tiny-llama")
    params = random_params(config)
    hf.save_hf(tmp_path, config, params, dtype="bfloat16", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    back = hf.params_from_hf(tmp_path)
    assert back["embed"]["embedding"].dtype == jnp.bfloat16
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(jnp.bfloat16)),
        back,
        params,
    )


@pytest.mark.parametrize("name", ["sinusoidal", "softcap", "relu_rope"])
def test_configs_without_hf_equivalent_are_refused(name, tmp_path):
    base = get_preset("tiny-llama")
    config = {
        "sinusoidal": dataclasses.replace(get_preset("tiny"), position="sinusoidal"),
        "softcap": dataclasses.replace(base, final_logit_softcap=30.0),
        "relu_rope": dataclasses.replace(base, activation="relu"),
    }[name]
    field = {"sinusoidal": "position", "softcap": "final_logit_softcap", "relu_rope": "activation"}
    params = random_params(config)
    with pytest.raises(ValueError, match=f"no Hugging Face equivalent.*{field[name]}="):
        hf.save_hf(tmp_path, config, params)
    assert not (tmp_path / "config.json").exists()


def test_forced_model_type_names_the_differing_fields(tmp_path):
    config = get_preset("tiny-llama")
    params = random_params(config)
    with pytest.raises(ValueError, match="not a Hugging Face 'gpt2' model: position='rope'"):
        hf.save_hf(tmp_path, config, params, model_type="gpt2")


@pytest.mark.parametrize("family", ["llama3", "qwen2_moe"])
def test_sharded_import_equals_single_device(family, tmp_path):
    """On 8 devices (fsdp 4 x tensor 2) each tensor lands in its sharding with the same values."""
    hf_models.build(family, tmp_path)
    config = hf.load_model_config(tmp_path)
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2, rules="fsdp_tp"))
    sharded = hf.params_from_hf(tmp_path, config, mesh=mesh, rules="fsdp_tp")
    single = hf.params_from_hf(tmp_path, config)
    want_shardings = param_shardings(config, mesh, "fsdp_tp")
    jax.tree.map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
        sharded,
        want_shardings,
    )
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
        for x in jax.tree.leaves(sharded)
    )
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_convert_cli_imports_and_exports(llama_dir, tmp_path, stdlib_cache, capsys):
    from jaxlm import cli

    run = tmp_path / "run"
    args = ["convert", "--from-hf", str(llama_dir), "--to", str(run)]
    assert cli.main([*args, "--set", "data.seq_len=32", "--set", "data.batch_size=8"]) == 0
    out = tmp_path / "hf"
    assert cli.main(["convert", "--to-hf", str(run), "--out", str(out)]) == 0
    tokens = np.random.default_rng(1).integers(0, 300, (1, 12))
    np.testing.assert_allclose(
        _hf_logits(out, tokens), _hf_logits(llama_dir, tokens), atol=1e-5, rtol=0
    )
    capsys.readouterr()
    assert cli.main(["convert", "--from-hf", str(llama_dir)]) == 2
    assert "--from-hf needs --to WORKDIR" in capsys.readouterr().err
    assert cli.main(["convert", "--to-hf", str(run)]) == 2
    assert cli.main(["convert", "--from-hf", str(tmp_path / "missing"), "--to", "x"]) == 2
