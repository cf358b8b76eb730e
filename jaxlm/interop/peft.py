"""LoRA adapters ⇄ the PEFT format (`adapter_config.json` + `adapter_model.safetensors`) that the
`peft` library loads onto a transformers model; merged exports.

PEFT keeps `lora_A.weight` [r, in] and `lora_B.weight` [out, r] per adapted `nn.Linear` with the
scale lora_alpha / r, which is jaxlm's A [in dims..., r] and B [r, out dims...] flattened and
transposed. Llama-layout families (Llama, Mistral, Qwen2/3 and their MoE attention) are supported;
GPT-2 fuses q, k and v in one `Conv1D`, which PEFT adapts as one matrix, so it is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import storage
from jaxlm.configs.model import LoRAConfig, ModelConfig
from jaxlm.files import read_json
from jaxlm.interop import safetensors_io
from jaxlm.interop.hf_weights import _block_location
from jaxlm.model.lora import is_adapter, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base_model"
# jaxlm target -> the HF module under `model.layers.{i}.`
HF_MODULES = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "out": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PARENT = {"query": "attn", "key": "attn", "value": "attn", "out": "attn"}
_PREFIX = "base_model.model.model.layers.{i}."


def _check_exportable(config: ModelConfig, model_type: str | None, adapter: bool = True) -> None:
    from jaxlm.interop.hf_families import export_family

    if config.prompt_tokens:
        raise ValueError(
            f"model.prompt_tokens={config.prompt_tokens}: prompt-tuning embeddings have no "
            "transformers equivalent; sample them with jaxlm"
        )
    family = export_family(dataclasses.replace(config, lora=LoRAConfig()), model_type)
    if adapter and family.model_type == "gpt2":
        raise ValueError(
            "PEFT adapters for GPT-2 are not supported (its q, k and v are one fused Conv1D); "
            "export with --lora merged"
        )


def _layer_params(params: Any, config: ModelConfig, i: int, target: str) -> dict[str, Any]:
    prefix, index = _block_location(config, i)
    node = params
    for key in (*prefix.strip("/").split("/"), _PARENT.get(target, "mlp"), target):
        node = node[key]
    if index is None:
        return node
    return {k: v[index] for k, v in node.items()}


def adapter_tensors(config: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} of every adapter in `params`."""
    out = {}
    for i in range(config.num_layers):
        for target in config.lora.target_names:
            node = _layer_params(params, config, i, target)
            a = np.asarray(jax.device_get(node["lora_a"]), np.float32)
            b = np.asarray(jax.device_get(node["lora_b"]), np.float32)
            name = _PREFIX.format(i=i) + HF_MODULES[target]
            out[f"{name}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).T
            out[f"{name}.lora_B.weight"] = b.reshape(b.shape[0], -1).T
    return out


def save_adapter(
    out_dir: str | Path, config: ModelConfig, params: Any, base: str = ""
) -> storage.AnyPath:
    """Write the LoRA adapters of `params` as a PEFT adapter directory (on disk or gs://)."""
    out_dir = storage.as_path(out_dir)
    lora = config.lora
    if not lora.rank:
        raise ValueError("this model has no LoRA adapters (model.lora.rank=0)")
    tensors = adapter_tensors(config, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [(n, x.shape, np.dtype(np.float32)) for n, x in tensors.items()]
    safetensors_io.write_file(out_dir / ADAPTER_WEIGHTS, specs, tensors.values())
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora.target_names),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    storage.write_text_atomic(out_dir / ADAPTER_CONFIG, json.dumps(adapter, indent=2) + "\n")
    return out_dir


def export_lora(
    workdir: str | Path,
    out_dir: str | Path,
    mode: str,
    *,
    step: int | None = None,
    model_type: str | None = None,
    dtype: str | None = None,
) -> storage.AnyPath:
    """Export a LoRA run: `mode="merged"` writes a plain transformers model with W + scale·A B;
    `mode="adapter"` writes the PEFT adapter to `out_dir` and the frozen base model (plain
    transformers files) to `out_dir/base_model`, which `adapter_config.json` names."""
    from jaxlm.interop.hf import save_hf, without_value_head
    from jaxlm.run import load_for_eval
    from jaxlm.tasks import partition

    if mode not in ("merged", "adapter"):
        raise ValueError(f"--lora {mode!r} must be 'merged' or 'adapter'")
    run, _, params, tokenizer = load_for_eval(workdir, step)
    config, params = without_value_head(run.model, params)
    if not config.lora.rank:
        raise ValueError(f"{workdir} has no LoRA adapters (model.lora.rank=0); drop --lora")
    _check_exportable(config, model_type, adapter=mode == "adapter")
    out_dir = storage.as_path(out_dir, absolute=True)
    if mode == "merged":
        plain, merged = merge_lora(config, params)
        return save_hf(
            out_dir, plain, merged, tokenizer=tokenizer, model_type=model_type, dtype=dtype
        )
    if config.lora.adapts("experts"):
        raise ValueError("PEFT adapters for MoE experts are not supported; use --lora merged")
    base, _ = partition(params, lambda n: not is_adapter(n))
    plain = dataclasses.replace(config, lora=LoRAConfig())
    base_dir = save_hf(
        out_dir / BASE_DIR, plain, base, tokenizer=tokenizer, model_type=model_type, dtype=dtype
    )
    save_adapter(out_dir, config, params, base=str(base_dir))
    return out_dir


def read_adapter(adapter_dir: str | Path, config: ModelConfig) -> tuple[ModelConfig, dict]:
    """(`config` with the adapter's LoRA settings, {(layer, target): (A, B)} in jaxlm's
    layout) from a PEFT adapter directory; a clear error when it was made for another base."""
    adapter_dir = storage.as_path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    spec = read_json(path, what="a PEFT adapter config")
    if spec.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {spec.get('peft_type')!r}; only LORA is supported")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if spec.get(key):
            raise ValueError(f"{path}: {key}=true is not supported")
    if spec.get("bias", "none") != "none" or spec.get("modules_to_save"):
        raise ValueError(
            f"{path}: adapters with trained biases or modules_to_save are not supported"
        )
    modules = spec.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    by_module = {v.split(".")[-1]: k for k, v in HF_MODULES.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(
            f"{path}: target_modules {unknown} have no jaxlm equivalent "
            f"(supported: {sorted(by_module)})"
        )
    targets = [by_module[m] for m in modules]
    lora = LoRAConfig(
        rank=int(spec["r"]),
        alpha=float(spec.get("lora_alpha", spec["r"])),
        dropout=float(spec.get("lora_dropout", 0.0)),
        targets=",".join(t for t in HF_MODULES if t in targets),
    )
    config = dataclasses.replace(config, lora=lora)
    _check_exportable(config, None)
    weights = safetensors_io.SafetensorsFile(adapter_dir / ADAPTER_WEIGHTS)
    d, n, k, h, f = (
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
    )
    dims = {
        "query": ((d,), (n, h)),
        "key": ((d,), (k, h)),
        "value": ((d,), (k, h)),
        "out": ((n, h), (d,)),
        "gate": ((d,), (f,)),
        "up": ((d,), (f,)),
        "down": ((f,), (d,)),
    }
    out = {}
    for i in range(config.num_layers):
        for t in lora.target_names:
            name = _PREFIX.format(i=i) + HF_MODULES[t]
            ins, outs = dims[t]
            want = {
                f"{name}.lora_A.weight": (lora.rank, int(np.prod(ins))),
                f"{name}.lora_B.weight": (int(np.prod(outs)), lora.rank),
            }
            for key, shape in want.items():
                if key not in weights.names():
                    raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} lacks {key}")
                if tuple(weights.shape(key)) != shape:
                    raise ValueError(
                        f"{key} is {tuple(weights.shape(key))} in the adapter but this base "
                        f"needs {shape}: the adapter was made for another base model"
                    )
            a = np.asarray(weights.view(f"{name}.lora_A.weight"), np.float32)
            b = np.asarray(weights.view(f"{name}.lora_B.weight"), np.float32)
            out[(i, t)] = (a.T.reshape(*ins, lora.rank), b.T.reshape(lora.rank, *outs))
    return config, out


def with_adapters(params: Any, config: ModelConfig, adapters: dict) -> Any:
    """`params` (a base without adapters) with the adapters of `read_adapter` added."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
    for t in config.lora.target_names:
        stacked = config.scan_layers
        for i in range(config.num_layers):
            prefix, index = _block_location(config, i)
            node = params
            for key in (*prefix.strip("/").split("/"), _PARENT.get(t, "mlp"), t):
                node = node[key]
            a, b = adapters[(i, t)]
            if not stacked:
                node["lora_a"], node["lora_b"] = a, b
                continue
            for key, x in (("lora_a", a), ("lora_b", b)):
                if key not in node:
                    count = sum(
                        1
                        for j in range(config.num_layers)
                        if _block_location(config, j)[0] == prefix
                    )
                    node[key] = np.zeros((count, *x.shape), np.float32)
                node[key][index] = x
    return params
