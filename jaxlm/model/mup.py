"""The Maximal Update Parametrization (muP; Yang et al. 2022, "Tensor Programs V"), for Adam-family
optimizers: per-parameter initialisation and learning-rate multipliers, the attention scale and
the output-logit multiplier, all relative to a base model (`ModelConfig.mup_base_width`).

The base model is this one with every width divided by m = d_model / mup_base_width: the
logical axes `embed` (d_model), `mlp`, `expert_mlp` and `head_dim` have width ratio m, all others
(vocabulary, heads, kv heads, experts, layers) ratio 1. So widen a muP model by `d_model` (and
`mlp_dim` / `head_dim` in proportion, as they are derived). A model widened by adding heads of
a fixed size sets `mup_base_head_dim` to its head_dim, which keeps SP's attention scale (the
multipliers below are the same either way: heads x head_dim grows by m). A weight's fan-in
ratio r_in is the product of its input dims' ratios, r_out of its output dims' (the last dim;
heads and head_dim for the query, key and value projections). Then, against standard
parametrization (SP) with the same hyperparameters:

| weight | r_in, r_out | init std | learning rate |
|---|---|---|---|
| hidden (attention, MLP, experts) | > 1, > 1 | x r_in^-1/2 | x 1 / r_in |
| readouts (router, score/value heads, shared-expert gate) | > 1, 1 | x 1 / r_in | x 1 / r_in |
| the LM head (tied or not) | | unchanged | unchanged; logits x d0 / d |
| embeddings, norms, biases, adapters | | unchanged | unchanged |

(init std multipliers are for `init="normal"`; "xavier" and "kaiming" already scale with the
fans, and are corrected by what they do.) Attention logits are q.k * sqrt(h0) / h instead of
q.k / sqrt(h). At the base width every multiplier is 1: a muP model is its SP model there, so
hyperparameters tuned on the base model apply to it and, under muP, to every wider one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.configs.model import ModelConfig

# Optimizers whose multipliers muP defines here: updates invariant to the gradient's scale.
MUP_OPTIMIZERS = ("adamw", "lion")


WIDTH_AXES = ("embed", "mlp", "expert_mlp", "head_dim")
# Weights whose logical axes (chosen for sharding) leave a width dim unnamed: their muP axes.
_AXES_BY_PATH = {"mlm_transform/dense/w": ("embed", "embed")}


def width_ratio(config: ModelConfig) -> float:
    """m = d_model / mup_base_width (1 under SP)."""
    if config.parametrization != "mup":
        return 1.0
    return config.d_model / (config.mup_base_width or config.d_model)


def base_head_dim(config: ModelConfig) -> float:
    """h0: the base model's head_dim, `mup_base_head_dim` or head_dim / m."""
    return config.mup_base_head_dim or config.head_dim / width_ratio(config)


def _dims(names: Sequence[str | None]) -> tuple[list[int], list[int]]:
    """(input dims, output dims) of a weight by its logical axis names: the output is the last
    dim, or heads and head_dim of a query / key / value projection [D, N, H]."""
    n = len(names)
    out = [n - 1]
    if n >= 2 and names[-1] == "head_dim" and names[-2] in ("heads", "kv_heads"):
        out = [n - 2, n - 1]
    return [i for i in range(n) if i not in out], out


@dataclasses.dataclass(frozen=True)
class Rule:
    """How muP treats one weight: `role` ("hidden", "readout", "head" or "fixed"), its fan-in
    and fan-out width ratios, and the multipliers on SP's init std and learning rate."""

    role: str
    r_in: float
    r_out: float
    init: float
    lr: float


def _rule(config: ModelConfig, name: str, names: Sequence, shape: Sequence) -> Rule:
    from jaxlm.model.lora import is_adapter

    if len(shape) < 2 or is_adapter(name):
        return Rule("fixed", 1.0, 1.0, 1.0, 1.0)
    names = _AXES_BY_PATH.get(name, names)
    m = width_ratio(config)
    ins, outs = _dims(names)
    r_in = math.prod(m if names[i] in WIDTH_AXES else 1.0 for i in ins)
    r_out = math.prod(m if names[i] in WIDTH_AXES else 1.0 for i in outs)
    if name.endswith("unembed/w"):  # the LM head: its logit multiplier scales it
        return Rule("head", r_in, r_out, 1.0, 1.0)
    if r_in == 1:  # embeddings, and weights whose input does not grow
        return Rule("fixed", r_in, r_out, 1.0, 1.0)
    kind = "hidden" if r_out != 1 else "readout"
    target = r_in**-0.5 if kind == "hidden" else 1.0 / r_in  # muP std / the base model's std
    if config.init == "normal":  # SP draws one std at every width
        init = target
    elif config.init == "kaiming":  # SP: std ~ fan_in^-1/2
        init = target * r_in**0.5
    else:  # xavier: std ~ (fan_in + fan_out)^-1/2
        fan_in, fan_out = (math.prod(shape[i] for i in dims) for dims in (ins, outs))
        init = target * math.sqrt((fan_in + fan_out) / (fan_in / r_in + fan_out / r_out))
    return Rule(kind, r_in, r_out, init, 1.0 / r_in)


@functools.lru_cache(maxsize=32)
def rules(config: ModelConfig) -> dict[str, Rule]:
    """'/'-joined parameter path -> its `Rule`; {} under SP."""
    if config.parametrization != "mup":
        return {}
    import flax.linen as nn

    from jaxlm.model.transformer import Transformer
    from jaxlm.tasks.base import param_names

    # SP's init (no rescale); parent=None: this may run inside Transformer.init.
    init = functools.partial(nn.Module.init, Transformer(config, parent=None))
    params = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))
    return {
        name: _rule(config, name, leaf.names, leaf.value.shape)
        for name, leaf in zip(param_names(params), leaves, strict=True)
    }


def rescale_init(config: ModelConfig, variables: Any) -> Any:
    """`variables` (from SP's init, boxed or not) with each weight times its muP init multiplier."""
    table = rules(config)
    if not table:
        return variables
    from jaxlm.optim import path_name

    def scale(path: tuple, w: jax.Array) -> jax.Array:
        name = path_name(path)
        rule = table.get(name.removeprefix("params/"))
        if rule is None or rule.init == 1.0 or not jnp.issubdtype(w.dtype, jnp.floating):
            return w
        return (w * rule.init).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(scale, variables)


def output_multiplier(config: ModelConfig) -> float:
    """The LM head's logit multiplier: 1 / m under muP, 1 under SP."""
    return 1.0 / width_ratio(config)


def attention_scale(config: ModelConfig) -> float:
    """What q.k is multiplied by: 1 / sqrt(h) under SP; sqrt(h0) / h under muP (1 / h scaling,
    equal to SP's at the base width)."""
    h = config.head_dim
    if config.parametrization != "mup":
        return h**-0.5
    return base_head_dim(config) ** 0.5 / h


def lr_multipliers(config: ModelConfig) -> dict[str, float]:
    """'/'-joined parameter path -> learning-rate multiplier, for the weights whose is not 1."""
    return {name: r.lr for name, r in rules(config).items() if r.lr != 1.0}


def describe(config: ModelConfig) -> list[str]:
    """Lines saying which muP multipliers apply (for `jaxlm info`); [] under SP."""
    if config.parametrization != "mup":
        return []
    groups: dict[tuple[str, float, float], list[str]] = {}
    for name, r in rules(config).items():
        if r.role in ("hidden", "readout"):
            short = "/".join(p for p in name.split("/") if p not in ("w", "layers", "params"))
            groups.setdefault((r.role, r.init, r.lr), []).append(short)
    lines = [
        f"muP: base width {config.mup_base_width or config.d_model}, d_model {config.d_model}, "
        f"width ratio m = {width_ratio(config):.4g} (every multiplier is 1 at m = 1)",
        f"  attention scale sqrt({base_head_dim(config):.4g})/{config.head_dim} = "
        f"{attention_scale(config):.4g} (SP: 1/sqrt({config.head_dim}) = "
        f"{config.head_dim**-0.5:.4g})",
        f"  output logits x {output_multiplier(config):.4g}",
    ]
    for (kind, init, lr), names in sorted(groups.items()):
        what = f"  {kind}: init std x {init:.4g}, learning rate x {lr:.4g}: "
        lines.append(what + ", ".join(names))
    lines.append("  unchanged: embeddings, the LM head's weights, norms, biases, adapters")
    return lines
