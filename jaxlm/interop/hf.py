"""Hugging Face interop: import a transformers model directory as a jaxlm workdir, export back.

Import reads `config.json`, the `*.safetensors` weights (one file or shards with
`model.safetensors.index.json`) and `tokenizer.json` / `tokenizer.model`; it never unpickles
anything (`*.bin` checkpoints are refused) and needs neither torch nor transformers. Tensors are
memory-mapped and placed one at a time straight onto their sharding, each device reading only its
own shard. Export writes `config.json`, safetensors and the tokenizer files that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlm import storage
from jaxlm.configs.model import LoRAConfig, ModelConfig
from jaxlm.configs.quant import QuantConfig
from jaxlm.configs.run import RunConfig
from jaxlm.files import read_json
from jaxlm.interop import safetensors_io
from jaxlm.interop.hf_config import hf_config, model_config
from jaxlm.interop.hf_families import export_family, family_of, position_offset
from jaxlm.interop.hf_weights import (
    canonical_name,
    export_tensors,
    hf_shapes,
    import_views,
    is_buffer,
    layout_of,
    placements,
)
from jaxlm.interop.workdir import write_workdir
from jaxlm.model.transformer import abstract_params, param_shardings
from jaxlm.sharding import Rules

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_LIST_LIMIT = 20  # names shown in an error message


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The `config.json` of a Hugging Face model directory (on disk or gs://), as a dict."""
    hf_dir = storage.as_path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{str(hf_dir)!r} is not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(hf_dir)!r} has no config.json (not a Hugging Face model?)")
    return read_json(path, what="a Hugging Face model config")


def open_weights(hf_dir: str | Path) -> safetensors_io.SafetensorsDir:
    """The safetensors weights of `hf_dir`; refuses pickled PyTorch checkpoints."""
    hf_dir = storage.as_path(hf_dir)
    if not any(hf_dir.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in _PICKLES for p in hf_dir.glob(pattern))
        if pickles:
            raise ValueError(
                f"{str(hf_dir)!r} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                "jaxlm never unpickles files, which can run arbitrary code. Convert them to "
                "safetensors first with a tool you trust, e.g. transformers' "
                "`model.save_pretrained(out_dir, safe_serialization=True)`"
            )
    return safetensors_io.SafetensorsDir(hf_dir)


def _checkpoint_dtype(weights: safetensors_io.SafetensorsDir) -> str:
    counts: dict[str, int] = {}
    for name in weights.names():
        kind = safetensors_io.dtype_name(weights.dtype(name))
        if kind.startswith(("F", "BF")):
            counts[kind] = counts.get(kind, 0) + 1
    kind = max(counts, key=counts.get) if counts else "F32"
    if kind not in _DTYPES:
        raise ValueError(
            f"the checkpoint's tensors are {kind}; pass dtype= one of {sorted(_DTYPES.values())}"
        )
    return _DTYPES[kind]


def load_model_config(
    hf_dir: str | Path, *, dtype: str | None = None, scan_layers: bool | None = None
) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory.

    `dtype` (parameters and compute) defaults to the checkpoint's own; `scan_layers` None scans
    whenever the layer pattern allows.
    """
    hf = read_hf_config(hf_dir)
    family_of(hf)  # unknown model types fail before the weights are opened
    dtype = dtype or _checkpoint_dtype(open_weights(hf_dir))
    return model_config(hf, dtype=dtype, scan_layers=scan_layers)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def _check_tensors(
    config: ModelConfig,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, str],
    weights: safetensors_io.SafetensorsDir,
    is_known_buffer: Callable[[str], bool],
    tied_output: str = "lm_head.weight",
) -> None:
    """Missing, unexpected and misshapen tensors, all named, before anything is placed."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(found[n] for n in set(found) - set(expected) if not is_known_buffer(n))
    if config.tie_embeddings and tied_output in extra:
        # Some checkpoints store the tied output matrix too: accept it only as an exact copy.
        extra.remove(tied_output)
        embed = next(
            n
            for n in expected
            if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))
        )
        a, b = weights.view(found[embed]), weights.view(tied_output)
        rows = max(1, 2**24 // max(1, a.shape[-1]))
        if a.shape != b.shape or any(
            not np.array_equal(a[i : i + rows], b[i : i + rows]) for i in range(0, len(a), rows)
        ):
            raise ValueError(
                f"tie_word_embeddings is true but {tied_output} differs from the embedding "
                f"{found[embed]}; set tie_word_embeddings to false in config.json"
            )
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the config needs: {_names(missing)}")
    if extra:
        raise ValueError(
            "the checkpoint has tensors this config does not use (nothing is dropped "
            f"silently; check config.json): {_names(extra)}"
        )
    wrong = [
        f"{found[n]} (expected {list(shape)}, found {list(weights.shape(found[n]))})"
        for n, shape in expected.items()
        if tuple(weights.shape(found[n])) != tuple(shape)
    ]
    if wrong:
        raise ValueError(f"tensor shapes do not match config.json: {_names(wrong)}")


def _place(view: Any, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(view[()], dtype=dtype))
    return jax.make_array_from_callback(
        tuple(view.shape), sharding, lambda index: np.asarray(view[index], dtype=dtype)
    )


def hf_views(hf_dir: str | Path, config: ModelConfig) -> dict[str, Any]:
    """{jaxlm parameter path: lazy array} over the memory-mapped tensors of `hf_dir`, after
    checking that they are exactly the tensors `config` needs (nothing is read yet)."""
    hf = read_hf_config(hf_dir)
    family = family_of(hf)
    weights = open_weights(hf_dir)
    leaves = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)), sep="/")
    offset = position_offset(family, hf.get("pad_token_id"))
    plan = placements(config, family, leaves, offset)
    expected = hf_shapes(config, plan, leaves)
    found = {canonical_name(family, n): n for n in weights.names()}
    _check_tensors(
        config,
        expected,
        found,
        weights,
        lambda n: is_buffer(family, n),
        layout_of(family).tied_output,
    )
    return import_views(config, plan, lambda n: weights.view(found[n]))


def params_from_hf(
    hf_dir: str | Path,
    config: ModelConfig | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | str = "fsdp",
    dtype: str | None = None,
) -> Any:
    """jaxlm parameters (a plain pytree) from a Hugging Face model directory.

    `config` defaults to `load_model_config(hf_dir, dtype=dtype)`. With a `mesh`, each tensor goes
    straight onto its sharding under `rules`, each device reading only its shard from the
    memory-mapped files; without one, onto the default device.
    """
    if config is None:
        config = load_model_config(hf_dir, dtype=dtype)
    elif dtype is not None:
        config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
    views = hf_views(hf_dir, config)
    shardings = (
        traverse_util.flatten_dict(param_shardings(config, mesh, rules), sep="/")
        if mesh is not None
        else dict.fromkeys(views)
    )
    param_dtype = jnp.dtype(config.param_dtype)
    flat = {path: _place(view, param_dtype, shardings[path]) for path, view in views.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def _leaf_reader(params: Any) -> tuple[dict[str, Any], Callable[[str, int | None], np.ndarray]]:
    leaves = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    take = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))

    def read(path: str, index: int | None) -> np.ndarray:
        x = leaves[path]
        if index is None:
            return np.asarray(jax.device_get(x))
        if isinstance(x, np.ndarray):
            return x[index]
        # One compiled slice per leaf shape; the host sees one layer at a time.
        return np.asarray(jax.device_get(take(x, index)))

    return leaves, read


def _tokenizer_files(tokenizer: Any, out_dir: storage.AnyPath, hf: dict[str, Any]) -> None:
    """Write the tokenizer in Hugging Face's file names and its special ids into `hf`."""
    if tokenizer is None:
        return
    for key, value in (
        ("bos_token_id", tokenizer.bos_id),
        ("eos_token_id", tokenizer.eos_id),
        ("pad_token_id", tokenizer.pad_id),
    ):
        hf[key] = value if 0 <= value < hf["vocab_size"] else None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        manifest = json.loads((Path(tmp) / "jaxlm_tokenizer.json").read_text())
        if manifest["kind"] == "hf":
            from tokenizers import Tokenizer as HFTok

            (out_dir / "tokenizer.json").write_bytes((Path(tmp) / manifest["file"]).read_bytes())
            tok = HFTok.from_file(str(Path(tmp) / manifest["file"]))
            special = {
                f"{name}_token": tok.id_to_token(hf[f"{name}_token_id"])
                for name in ("bos", "eos", "pad")
                if hf[f"{name}_token_id"] is not None
            }
            if getattr(tokenizer, "mask_id", -1) >= 0:
                special["mask_token"] = tok.id_to_token(tokenizer.mask_id)
            if hf.get("model_type") in ("bert", "roberta"):  # "[CLS] text [SEP]"
                special |= {
                    "cls_token": special.get("bos_token"),
                    "sep_token": special.get("eos_token"),
                }
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
            (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        elif manifest["kind"] == "sentencepiece":
            (out_dir / "tokenizer.model").write_bytes((Path(tmp) / manifest["file"]).read_bytes())
        # The byte tokenizer has no Hugging Face file format: the ids are the bytes + 3.


def save_hf(
    out_dir: str | Path,
    config: ModelConfig,
    params: Any,
    *,
    tokenizer: Any = None,
    model_type: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `params` of `config` as a Hugging Face model directory and return it.

    `model_type` (default: the first family that matches exactly) must represent `config`
    exactly, else a ValueError names the fields that differ. Tensors are written one at a time
    in `dtype` (default: the parameters' dtype).
    """
    check_exportable_mup(config)
    out_dir = storage.as_path(out_dir)
    family = export_family(config, model_type)
    hf = hf_config(config, family.model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None and family.model_type == "gpt2":
        hf |= {"bos_token_id": None, "eos_token_id": None}  # not GPT2Config's 50256
    _tokenizer_files(tokenizer, out_dir, hf)
    offset = 0
    if family.encoder:
        if hf.get("pad_token_id") is None:
            hf["pad_token_id"] = family.defaults["pad_token_id"]
        offset = position_offset(family, hf["pad_token_id"])  # the tokenizer's pad decides it
        hf["max_position_embeddings"] = config.max_seq_len + offset
    leaves, read_leaf = _leaf_reader(params)
    plan = placements(config, family, leaves, offset)
    shapes = hf_shapes(config, plan, leaves)
    names, read = export_tensors(config, plan, read_leaf)
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    hf["dtype"] = str(out_dtype)
    specs = [(n, shapes[n], out_dtype) for n in names]
    safetensors_io.write_dir(out_dir, specs, lambda n: read(n).astype(out_dtype), max_shard_bytes)
    storage.write_text_atomic(out_dir / "config.json", json.dumps(hf, indent=2) + "\n")
    return out_dir


def check_exportable_mup(config: ModelConfig) -> None:
    """Refuse a muP model wider than its base: its logit multiplier and attention scale have no
    Hugging Face config field."""
    from jaxlm.model import mup

    mult, scale = mup.output_multiplier(config), mup.attention_scale(config)
    if mult != 1.0 or scale != config.head_dim**-0.5:
        raise ValueError(
            f"a muP model at d_model={config.d_model} (model.mup_base_width="
            f"{config.mup_base_width}) multiplies its logits by {mult:.4g} and its attention "
            f"logits by {scale:.4g} instead of 1/sqrt(head_dim); Hugging Face configs have no "
            "such fields, so it cannot be exported (a muP model at its base width can)"
        )


def without_value_head(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """The policy alone: a PPO run's value head (its critic) has no Hugging Face counterpart
    and is left out of exports."""
    if not config.value_head:
        return config, params
    return dataclasses.replace(config, value_head=False), {
        k: v for k, v in params.items() if k != "value"
    }


def export_checkpoint(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    model_type: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Export the checkpoint at `step` (default: the newest) of a jaxlm workdir (see `save_hf`)."""
    from jaxlm.run import load_for_eval

    run, _, params, tokenizer = load_for_eval(workdir, step)
    model, params = without_value_head(run.model, params)
    run = dataclasses.replace(run, model=model)
    if run.model.lora.rank:
        raise ValueError(
            f"{workdir} holds LoRA adapters: export with --lora merged (a plain model) or "
            "--lora adapter (a PEFT adapter and its base)"
        )
    return save_hf(
        out_dir,
        run.model,
        params,
        tokenizer=tokenizer,
        model_type=model_type,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )


def _special_ids(hf_dir: storage.AnyPath, hf: Mapping[str, Any]) -> dict[str, int]:
    """bos/eos/pad ids from config.json, else generation_config.json (first of a list)."""
    sources = [hf]
    generation = hf_dir / "generation_config.json"
    if generation.is_file():
        sources.append(read_json(generation, what="a generation config"))
    ids = {}
    for name in ("bos", "eos", "pad"):
        for source in sources:
            value = source.get(f"{name}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                ids[f"{name}_id"] = value
                break
    return ids


def load_hf_tokenizer(hf_dir: str | Path) -> Any:
    """The tokenizer of a Hugging Face model directory (`tokenizer.json`, else
    `tokenizer.model`), with the special ids its configs name; None when it has neither."""
    from jaxlm.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    hf_dir = storage.as_path(hf_dir)
    if (hf_dir / "tokenizer.json").is_file():
        ids = _special_ids(hf_dir, read_hf_config(hf_dir))
        return HFTokenizer.load(storage.local_copy(hf_dir / "tokenizer.json"), **ids)
    if (hf_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer.load(storage.local_copy(hf_dir / "tokenizer.model"))
    return None


def import_checkpoint(
    hf_dir: str | Path,
    workdir: str | Path,
    *,
    run_config: RunConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: str | None = None,
    dtype: str | None = None,
    scan_layers: bool | None = None,
    tokenizer: str | None = None,
    adapter: str | Path | None = None,
    quant: QuantConfig | None = None,
) -> Path:
    """Convert a Hugging Face model directory into a new jaxlm workdir and return its path.

    `adapter`: a PEFT LoRA adapter directory made for this model; the run then holds the base
    and the adapters (`model.lora` from its `adapter_config.json`). `quant`: store the weights
    quantized (`jaxlm.compress.quantize`; an adapter is merged into them first).

    The workdir holds a complete step-0 checkpoint (`jaxlm.interop.workdir`): `jaxlm sample`,
    `jaxlm eval` and `jaxlm train --workdir` (fine-tuning) use it unchanged. `run_config` sets
    everything but the model (that fine-tune's data, optimizer, steps, mesh); `tokenizer` (a
    `make_tokenizer` spec) replaces the directory's own tokenizer; `dtype` the checkpoint's.
    """
    base = load_model_config(hf_dir, dtype=dtype, scan_layers=scan_layers)
    hf_views(hf_dir, base)  # bad tensors fail before the workdir is touched
    config, adapters = base, None
    if adapter is not None:
        from jaxlm.interop.peft import read_adapter

        config, adapters = read_adapter(adapter, base)
    tok = load_hf_tokenizer(hf_dir) if tokenizer is None else None

    float_config = config
    if quant is not None:
        from jaxlm.compress.quantize import quantize_params, quantized_config

        config = dataclasses.replace(quantized_config(config, quant), lora=LoRAConfig())

    def make_params(mesh: jax.sharding.Mesh, rules: str) -> Any:
        params = params_from_hf(hf_dir, base, mesh=mesh, rules=rules)
        if adapters is not None:
            from jaxlm.interop.peft import with_adapters

            params = with_adapters(params, float_config, adapters)
        if quant is not None:
            params = quantize_params(float_config, params, quant, mesh=mesh, rules=rules)[1]
        return params

    return write_workdir(
        workdir,
        config,
        make_params,
        run_config=run_config,
        mesh=mesh,
        rules=rules,
        tokenizer=tok,
        tokenizer_spec=tokenizer,
    )
