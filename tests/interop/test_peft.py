"""LoRA export and import in PEFT's format, checked with the real `peft` library on transformers:
a jaxlm LoRA run (adapters non-zero) exported as an adapter or merged gives the same logits."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxlm import storage  # noqa: E402
from jaxlm.configs import LoRAConfig  # noqa: E402
from jaxlm.configs.run import DataConfig, RunConfig, TrainConfig  # noqa: E402
from jaxlm.interop import hf  # noqa: E402
from jaxlm.interop.peft import export_lora, read_adapter  # noqa: E402
from jaxlm.interop.workdir import write_workdir  # noqa: E402
from jaxlm.model.lora import is_adapter  # noqa: E402
from jaxlm.model.transformer import Transformer  # noqa: E402
from jaxlm.run import load_for_eval  # noqa: E402
from jaxlm.tasks import param_names  # noqa: E402
from tests.interop import hf_models  # noqa: E402

LORA = LoRAConfig(rank=4, alpha=8.0, targets="query,key,value,out,gate,up,down")
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 10))


def _logits(config, params):
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(TOKENS))[0])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, _session_cache):
    """A tiny Llama 3 imported with random non-zero adapters (as if LoRA had trained)."""
    root = tmp_path_factory.mktemp("peft")
    hf_models.build("llama3", root / "hf")
    base = hf.load_model_config(root / "hf")
    config = dataclasses.replace(base, lora=LORA)

    def make(mesh, rules):
        params = hf.params_from_hf(root / "hf", base)
        shapes = jax.eval_shape(
            lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        )["params"]
        rng = np.random.default_rng(1)

        def fill(node, shape):
            out = {}
            for k, v in shape.items():
                if isinstance(v, dict):
                    out[k] = fill(node.get(k, {}), v)
                elif k in ("lora_a", "lora_b"):
                    out[k] = 0.3 * rng.standard_normal(v.value.shape).astype(np.float32)
                else:
                    out[k] = node[k]
            return out

        return fill(params, shapes)

    run = RunConfig(
        data=DataConfig(seq_len=32, batch_size=8), train=TrainConfig(steps=1, sample_tokens=0)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        workdir = write_workdir(root / "run", config, make, run_config=run)
    return root, workdir


def test_exported_adapter_loads_in_peft_with_the_same_logits(lora_run):
    root, workdir = lora_run
    run, _, params, _ = load_for_eval(workdir)
    ours = _logits(run.model, params)
    out = export_lora(workdir, root / "adapter", "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    with torch.no_grad():
        plain = base(torch.tensor(TOKENS)).logits.numpy()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(plain - ours).max() > 1e-2  # the adapters change the output
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    spec = json.loads((out / "adapter_config.json").read_text())
    assert spec["r"] == 4 and spec["lora_alpha"] == 8.0


def test_merged_export_loads_in_transformers_with_the_same_logits(lora_run, tmp_path):
    _, workdir = lora_run
    run, _, params, _ = load_for_eval(workdir)
    # Through the CLI, as a user would.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm",
            "convert",
            "--to-hf",
            str(workdir),
            "--out",
            str(tmp_path / "merged"),
            "--lora",
            "merged",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(run.model, params), atol=1e-4, rtol=0)
    plain = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm",
            "convert",
            "--to-hf",
            str(workdir),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 2 and "--lora merged" in plain.stderr


def test_a_peft_adapter_imports_onto_its_base(lora_run, _session_cache, monkeypatch, gcs_bucket):
    root, workdir = lora_run
    monkeypatch.setenv("JAXLM_CACHE", str(_session_cache))
    out = root / "adapter2"
    export_lora(workdir, out, "adapter")
    imported = hf.import_checkpoint(root / "hf", root / "imported", adapter=out)
    run, _, params, _ = load_for_eval(imported)
    _, _, want, _ = load_for_eval(workdir)
    assert run.model.lora == LORA
    assert [n for n in param_names(params) if is_adapter(n)]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        params,
        want,
    )
    # The same adapter exported into a bucket (the Cloud Storage emulator) reads back the same.
    bucket = f"{gcs_bucket}/adapter"
    export_lora(workdir, bucket, "adapter")
    base = hf.load_model_config(root / "hf")
    got, expected = read_adapter(bucket, base), read_adapter(out, base)
    assert got[0] == expected[0]
    jax.tree.map(np.testing.assert_array_equal, got[1], expected[1])
    spec = json.loads(storage.as_path(f"{bucket}/adapter_config.json").read_text())
    assert spec["base_model_name_or_path"] == f"{bucket}/base_model"
    # An adapter for another base is refused, naming the tensor and the shapes.
    other = dataclasses.replace(hf.load_model_config(root / "hf"), d_model=96, head_dim=16)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight is \(4, 64\).*needs \(4, 96\)"):
        read_adapter(out, other)
