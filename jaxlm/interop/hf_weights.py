"""Hugging Face tensors ⇄ jaxlm parameters: per-family name tables and lazy layout transforms.

Each `Rule` ties jaxlm parameters (paths inside a block, or at the top) to Hugging Face tensors
and converts both ways: HF `nn.Linear` weights are [out, in] and jaxlm's are [in, out] with the
head axes split out ([D, N, H], [N, H, D]); GPT-2's `Conv1D` is already [in, out] and fuses q, k
and v in one tensor. Which rules apply is decided by the parameters the `ModelConfig` creates, so
biases, QK-norms and untied outputs need no special cases: a tensor the config does not expect is
reported as unexpected, one it expects and the checkpoint lacks as missing.

Import builds lazy views (NumPy views of memory-mapped files, stacked over layers and experts
without copying), so a device reads only its own shard of each tensor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.model import ModelConfig
from jaxlm.interop.hf_families import Family

Arrays = Sequence[Any]


@dataclasses.dataclass(frozen=True)
class Rule:
    """jaxlm parameters `jax` ⇄ HF tensors `hf` through `to_jax` / `to_hf` (lists in, lists out).

    `{e}` in an HF name marks a per-expert tensor, stacked on jaxlm's leading expert axis.
    """

    jax: tuple[str, ...]
    hf: tuple[str, ...]
    to_jax: Callable[[Arrays], list[Any]]
    to_hf: Callable[[Arrays], list[Any]]

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf[0]


def _concat(xs: Arrays, axis: int) -> Any:
    # Shapes are worked out by tracing to_hf under jax.eval_shape; real exports stay in NumPy.
    return (np if isinstance(xs[0], np.ndarray) else jnp).concatenate(xs, axis=axis)


def _pad_rows(x: Any, rows: int) -> Any:
    """x [P, D] with `rows` zero rows on top (RoBERTa's unused positions before position 0)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([xp.zeros((rows, x.shape[1]), x.dtype), x], axis=0) if rows else x


def _transforms(cfg: ModelConfig, offset: int = 0) -> dict[str, tuple[Callable, Callable]]:
    """{kind: (HF tensors -> jaxlm views, jaxlm arrays -> HF tensors)} for the sizes of `cfg`;
    `offset`: rows of the HF position table before position 0."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def one(f: Callable, g: Callable) -> tuple[Callable, Callable]:
        return (lambda xs: [f(xs[0])]), (lambda xs: [g(xs[0])])

    def split3(x: Any, width: int, shape: tuple[int, ...]) -> list[Any]:
        return [x[..., i * width : (i + 1) * width].reshape(shape) for i in range(3)]

    return {
        "same": one(lambda x: x, lambda x: x),
        "positions": one(lambda x: x[offset:], lambda x: _pad_rows(x, offset)),
        "dup": (lambda xs: [xs[0]], lambda xs: [xs[0], xs[0]]),
        "linear": one(lambda x: x.T, lambda x: x.T),
        "q_in": one(lambda x: x.T.reshape(d, n, h), lambda x: x.reshape(d, n * h).T),
        "kv_in": one(lambda x: x.T.reshape(d, k, h), lambda x: x.reshape(d, k * h).T),
        "q_bias": one(lambda x: x.reshape(n, h), lambda x: x.reshape(n * h)),
        "kv_bias": one(lambda x: x.reshape(k, h), lambda x: x.reshape(k * h)),
        "out": one(lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T),
        # GPT-2 Conv1D: [in, out] already; c_attn holds q | k | v along its output axis.
        "conv_out": one(lambda x: x.reshape(n, h, d), lambda x: x.reshape(n * h, d)),
        "conv_qkv": (
            lambda xs: split3(xs[0], d, (d, n, h)),
            lambda xs: [_concat([x.reshape(d, n * h) for x in xs], axis=1)],
        ),
        "conv_qkv_bias": (
            lambda xs: split3(xs[0], d, (n, h)),
            lambda xs: [_concat([x.reshape(n * h) for x in xs], axis=0)],
        ),
    }


# (jaxlm path or paths, HF name, transform kind). Block rows are relative to a layer.
_LLAMA_TOP = (
    ("embed/embedding", "model.embed_tokens.weight", "same"),
    ("final_norm/scale", "model.norm.weight", "same"),
    ("unembed/w", "lm_head.weight", "linear"),
    ("score/w", "score.weight", "linear"),
)
_LLAMA_BLOCK = (
    ("attn_norm/scale", "input_layernorm.weight", "same"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "same"),
    ("attn/query/w", "self_attn.q_proj.weight", "q_in"),
    ("attn/key/w", "self_attn.k_proj.weight", "kv_in"),
    ("attn/value/w", "self_attn.v_proj.weight", "kv_in"),
    ("attn/out/w", "self_attn.o_proj.weight", "out"),
    ("attn/query/b", "self_attn.q_proj.bias", "q_bias"),
    ("attn/key/b", "self_attn.k_proj.bias", "kv_bias"),
    ("attn/value/b", "self_attn.v_proj.bias", "kv_bias"),
    ("attn/out/b", "self_attn.o_proj.bias", "same"),
    ("attn/query_norm/scale", "self_attn.q_norm.weight", "same"),
    ("attn/key_norm/scale", "self_attn.k_norm.weight", "same"),
    ("mlp/gate/w", "mlp.gate_proj.weight", "linear"),
    ("mlp/up/w", "mlp.up_proj.weight", "linear"),
    ("mlp/down/w", "mlp.down_proj.weight", "linear"),
    ("mlp/gate/b", "mlp.gate_proj.bias", "same"),
    ("mlp/up/b", "mlp.up_proj.bias", "same"),
    ("mlp/down/b", "mlp.down_proj.bias", "same"),
)
_MIXTRAL_MOE = (
    ("moe/router/w", "block_sparse_moe.gate.weight", "linear"),
    ("moe/gate", "block_sparse_moe.experts.{e}.w1.weight", "linear"),
    ("moe/up", "block_sparse_moe.experts.{e}.w3.weight", "linear"),
    ("moe/down", "block_sparse_moe.experts.{e}.w2.weight", "linear"),
)
_QWEN_MOE = (
    ("moe/router/w", "mlp.gate.weight", "linear"),
    ("moe/gate", "mlp.experts.{e}.gate_proj.weight", "linear"),
    ("moe/up", "mlp.experts.{e}.up_proj.weight", "linear"),
    ("moe/down", "mlp.experts.{e}.down_proj.weight", "linear"),
    ("moe/shared/gate/w", "mlp.shared_expert.gate_proj.weight", "linear"),
    ("moe/shared/up/w", "mlp.shared_expert.up_proj.weight", "linear"),
    ("moe/shared/down/w", "mlp.shared_expert.down_proj.weight", "linear"),
    ("moe/shared_gate/w", "mlp.shared_expert_gate.weight", "linear"),
)
_GPT2_TOP = (
    ("embed/embedding", "transformer.wte.weight", "same"),
    ("pos_embed/embedding", "transformer.wpe.weight", "same"),
    ("final_norm/scale", "transformer.ln_f.weight", "same"),
    ("final_norm/bias", "transformer.ln_f.bias", "same"),
    ("unembed/w", "lm_head.weight", "linear"),
    ("score/w", "score.weight", "linear"),
)
_GPT2_BLOCK = (
    ("attn_norm/scale", "ln_1.weight", "same"),
    ("attn_norm/bias", "ln_1.bias", "same"),
    ("mlp_norm/scale", "ln_2.weight", "same"),
    ("mlp_norm/bias", "ln_2.bias", "same"),
    (("attn/query/w", "attn/key/w", "attn/value/w"), "attn.c_attn.weight", "conv_qkv"),
    (("attn/query/b", "attn/key/b", "attn/value/b"), "attn.c_attn.bias", "conv_qkv_bias"),
    ("attn/out/w", "attn.c_proj.weight", "conv_out"),
    ("attn/out/b", "attn.c_proj.bias", "same"),
    ("mlp/up/w", "mlp.c_fc.weight", "same"),
    ("mlp/up/b", "mlp.c_fc.bias", "same"),
    ("mlp/down/w", "mlp.c_proj.weight", "same"),
    ("mlp/down/b", "mlp.c_proj.bias", "same"),
)


def _encoder_top(model: str, head: str, head_norm: str, bias: str) -> tuple:
    """BERT-style embeddings and masked-LM head rows (`model`: "bert" / "roberta")."""
    e = f"{model}.embeddings."
    decoder = f"{head.replace('transform.', '')}decoder"
    return (
        ("embed/embedding", f"{e}word_embeddings.weight", "same"),
        ("pos_embed/embedding", f"{e}position_embeddings.weight", "positions"),
        ("type_embed/embedding", f"{e}token_type_embeddings.weight", "same"),
        ("embed_norm/scale", f"{e}LayerNorm.weight", "same"),
        ("embed_norm/bias", f"{e}LayerNorm.bias", "same"),
        ("mlm_transform/dense/w", f"{head}dense.weight", "linear"),
        ("mlm_transform/dense/b", f"{head}dense.bias", "same"),
        ("mlm_transform/norm/scale", f"{head}{head_norm}.weight", "same"),
        ("mlm_transform/norm/bias", f"{head}{head_norm}.bias", "same"),
        # Tied, the output bias is `bias` (the decoder's is a tied copy some files hold too);
        # untied (transformers 5), the decoder's own bias is used and `bias` is left unused:
        # read the decoder's, write it to both.
        ("output_bias", bias, "same", lambda c: c.tie_embeddings),
        ("output_bias", (f"{decoder}.bias", bias), "dup", lambda c: not c.tie_embeddings),
        ("unembed/w", f"{decoder}.weight", "linear"),
    )


_ENCODER_BLOCK = (
    ("attn/query/w", "attention.self.query.weight", "q_in"),
    ("attn/key/w", "attention.self.key.weight", "kv_in"),
    ("attn/value/w", "attention.self.value.weight", "kv_in"),
    ("attn/query/b", "attention.self.query.bias", "q_bias"),
    ("attn/key/b", "attention.self.key.bias", "kv_bias"),
    ("attn/value/b", "attention.self.value.bias", "kv_bias"),
    ("attn/out/w", "attention.output.dense.weight", "out"),
    ("attn/out/b", "attention.output.dense.bias", "same"),
    ("attn_norm/scale", "attention.output.LayerNorm.weight", "same"),
    ("attn_norm/bias", "attention.output.LayerNorm.bias", "same"),
    ("mlp/up/w", "intermediate.dense.weight", "linear"),
    ("mlp/up/b", "intermediate.dense.bias", "same"),
    ("mlp/down/w", "output.dense.weight", "linear"),
    ("mlp/down/b", "output.dense.bias", "same"),
    ("mlp_norm/scale", "output.LayerNorm.weight", "same"),
    ("mlp_norm/bias", "output.LayerNorm.bias", "same"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family keeps its tensors."""

    top: tuple
    block: tuple
    layer_prefix: str
    # Tensors that are not parameters (causal-mask and RoPE buffers in older checkpoints, an
    # encoder's pooler and next-sentence head, which masked LM does not use).
    buffers: str
    # A prefix some checkpoints of the family leave out (GPT-2's "transformer.").
    optional_prefix: str = ""
    # The output matrix a checkpoint may store although it is tied to the embedding.
    tied_output: str = "lm_head.weight"
    # Names outside the optional prefix (the heads).
    head_prefixes: tuple[str, ...] = ("lm_head.weight", "score.weight")


_LLAMA_BUFFERS = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
LAYOUTS = {
    "gpt2": Layout(
        _GPT2_TOP,
        _GPT2_BLOCK,
        "transformer.h.{i}.",
        r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
        optional_prefix="transformer.",
    ),
    "dense": Layout(_LLAMA_TOP, _LLAMA_BLOCK, "model.layers.{i}.", _LLAMA_BUFFERS),
    "mixtral": Layout(_LLAMA_TOP, _LLAMA_BLOCK + _MIXTRAL_MOE, "model.layers.{i}.", _LLAMA_BUFFERS),
    "qwen": Layout(_LLAMA_TOP, _LLAMA_BLOCK + _QWEN_MOE, "model.layers.{i}.", _LLAMA_BUFFERS),
    "bert": Layout(
        _encoder_top("bert", "cls.predictions.transform.", "LayerNorm", "cls.predictions.bias"),
        _ENCODER_BLOCK,
        "bert.encoder.layer.{i}.",
        r"bert\.embeddings\.position_ids|bert\.pooler\..*|cls\.seq_relationship\..*"
        r"|cls\.predictions\.(decoder\.)?bias",
        optional_prefix="bert.",
        tied_output="cls.predictions.decoder.weight",
        head_prefixes=("cls.",),
    ),
    "roberta": Layout(
        _encoder_top("roberta", "lm_head.", "layer_norm", "lm_head.bias"),
        _ENCODER_BLOCK,
        "roberta.encoder.layer.{i}.",
        r"roberta\.embeddings\.position_ids|roberta\.pooler\..*|lm_head\.(decoder\.)?bias",
        optional_prefix="roberta.",
        tied_output="lm_head.decoder.weight",
        head_prefixes=("lm_head.",),
    ),
}


def layout_of(family: Family) -> Layout:
    if family.encoder:
        return LAYOUTS[family.model_type]
    if family.model_type == "gpt2":
        return LAYOUTS["gpt2"]
    if family.moe == "mixtral":
        return LAYOUTS["mixtral"]
    return LAYOUTS["qwen"] if family.moe else LAYOUTS["dense"]


def _rules(rows: tuple, cfg: ModelConfig, offset: int = 0) -> list[Rule]:
    kinds = _transforms(cfg, offset)
    out = []
    for paths, names, kind, *when in rows:  # `when`: an optional predicate on the config
        if when and not when[0](cfg):
            continue
        paths = (paths,) if isinstance(paths, str) else tuple(paths)
        names = (names,) if isinstance(names, str) else tuple(names)
        out.append(Rule(paths, names, *kinds[kind]))
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """One application of a rule: jaxlm leaves (full paths), the index into their stacked
    leading axis (None: unstacked), and the HF names (expert `{e}` still unfilled)."""

    rule: Rule
    leaves: tuple[str, ...]
    stack_index: int | None
    hf: tuple[str, ...]


def _block_location(cfg: ModelConfig, i: int) -> tuple[str, int | None]:
    """(path prefix of layer i's parameters, index on their stacked axis or None)."""
    if not cfg.scan_layers:
        return f"layers_{i}/", None
    every = cfg.moe.every if cfg.moe.enabled and cfg.moe.every > 1 else 1
    if every > 1:
        return f"layers/block_{i % every}/", i // every
    return "layers/", i


def placements(
    cfg: ModelConfig, family: Family, leaves: dict[str, Any], position_offset: int = 0
) -> list[Placement]:
    """Every rule application for `cfg`; checks that each jaxlm leaf is covered exactly once.

    `position_offset`: rows of the HF position table before position 0 (RoBERTa's padding)."""
    layout = layout_of(family)
    out: list[Placement] = []
    used: set[str] = set()

    def apply(rules: list[Rule], prefix: str, index: int | None, hf_prefix: str) -> None:
        for rule in rules:
            full = tuple(prefix + p for p in rule.jax)
            present = [p in leaves for p in full]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"internal: partial jaxlm parameters for {rule.hf}: {full}")
            out.append(Placement(rule, full, index, tuple(hf_prefix + n for n in rule.hf)))
            used.update(full)

    apply(_rules(layout.top, cfg, position_offset), "", None, "")
    block = _rules(layout.block, cfg)
    for i in range(cfg.num_layers):
        prefix, index = _block_location(cfg, i)
        apply(block, prefix, index, layout.layer_prefix.format(i=i))
    uncovered = sorted(set(leaves) - used)
    if uncovered:
        raise ValueError(
            f"jaxlm parameters {uncovered} have no {family.model_type} tensor "
            "(this configuration has no Hugging Face equivalent)"
        )
    return out


def _unstacked(shape: tuple[int, ...], p: Placement, expert: bool) -> tuple[int, ...]:
    shape = shape[1:] if p.stack_index is not None else shape
    return shape[1:] if expert else shape


def hf_shapes(
    cfg: ModelConfig, plan: list[Placement], leaves: dict[str, Any]
) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor the plan reads or writes (experts expanded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    traced: dict[tuple, list] = {}  # layers repeat: trace each rule once per input shapes
    for p in plan:
        per_expert = p.rule.per_expert
        ins = tuple(_unstacked(tuple(leaves[x].shape), p, per_expert) for x in p.leaves)
        if (p.rule, ins) not in traced:
            structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ins]
            traced[p.rule, ins] = jax.eval_shape(lambda *xs, r=p.rule: r.to_hf(xs), *structs)
        outs = traced[p.rule, ins]
        for name, o in zip(p.hf, outs, strict=True):
            if per_expert:
                for e in range(cfg.moe.num_experts):
                    shapes[name.format(e=e)] = tuple(o.shape)
            else:
                shapes[name] = tuple(o.shape)
    return shapes


def is_buffer(family: Family, name: str) -> bool:
    return re.fullmatch(layout_of(family).buffers, name) is not None


def canonical_name(family: Family, name: str) -> str:
    """`name` with the family's optional prefix added where a checkpoint left it out."""
    layout = layout_of(family)
    prefix = layout.optional_prefix
    if prefix and not name.startswith((prefix, *layout.head_prefixes)):
        return prefix + name
    return name


class LazyStack:
    """Arrays of one shape stacked on a new leading axis, read only where indexed."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.dtype = self.parts[0].dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        head, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(head, (int, np.integer)):
            return np.asarray(self.parts[head][rest])
        return np.stack([np.asarray(self.parts[i][rest]) for i in range(len(self.parts))[head]])


def import_views(
    cfg: ModelConfig, plan: list[Placement], view: Callable[[str], np.ndarray]
) -> dict[str, Any]:
    """{jaxlm leaf path: lazy array in jaxlm's layout} from HF tensor views `view(name)`."""
    per_leaf: dict[str, dict[int | None, Any]] = {}
    for p in plan:
        if p.rule.per_expert:
            by_expert = [
                p.rule.to_jax([view(n.format(e=e)) for n in p.hf])
                for e in range(cfg.moe.num_experts)
            ]
            outs = [LazyStack([b[j] for b in by_expert]) for j in range(len(p.leaves))]
        else:
            outs = p.rule.to_jax([view(n) for n in p.hf])
        for leaf, x in zip(p.leaves, outs, strict=True):
            per_leaf.setdefault(leaf, {})[p.stack_index] = x
    views = {}
    for leaf, by_index in per_leaf.items():
        if None in by_index:
            views[leaf] = by_index[None]
        else:
            views[leaf] = LazyStack([by_index[i] for i in sorted(by_index)])
    return views


def export_tensors(
    cfg: ModelConfig, plan: list[Placement], read_leaf: Callable[[str, int | None], np.ndarray]
) -> tuple[list[str], Callable[[str], np.ndarray]]:
    """(HF names in writing order, name -> HF tensor) from `read_leaf(path, stack_index)`.

    Layer slices are read once per rule application and reused for that layer's experts.
    """
    names: list[str] = []
    source: dict[str, tuple[Placement, int, int | None]] = {}
    for p in plan:
        for j, name in enumerate(p.hf):
            experts = range(cfg.moe.num_experts) if p.rule.per_expert else [None]
            for e in experts:
                full = name if e is None else name.format(e=e)
                names.append(full)
                source[full] = (p, j, e)
    cache: dict[tuple[str, int | None], np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        p, j, e = source[name]
        key = [(leaf, p.stack_index) for leaf in p.leaves]
        if any(k not in cache for k in key):
            cache.clear()  # plans visit one layer at a time: keep only the current slices
            cache.update({k: read_leaf(*k) for k in key})
        ins = [cache[k] if e is None else cache[k][e] for k in key]
        return np.asarray(p.rule.to_hf(ins)[j])

    return names, read
