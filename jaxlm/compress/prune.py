"""Structured pruning: whole attention heads (kv groups: a kv head with its query heads), MLP
neurons and layers removed by importance, giving a smaller `ModelConfig` and its parameters.

Importance of a group of weights (all the weights that exist only for one kv group, one neuron,
or one layer):
- "magnitude": the L2 norm of the group's weights;
- "taylor": |Σ w · ∂L/∂w| over the group (the first-order change of the calibration loss L when
  the group is set to zero; Molchanov et al., 2019), L = the mean next-token cross-entropy of
  the calibration batches.
Every layer keeps the same number of heads and neurons (its own best ones), so the result is one
plain config (scanned layers stay stacked). For a target size, how many heads, neurons and
layers stay is chosen by measuring: of the sizes that fit, the one whose pruned model has the
lowest loss on the calibration batches. Removing a head or neuron is exact: the pruned model
computes what the original computes with those groups' output weights zeroed. Layers can go only
in pre-LN models (a pre-LN block with its output projections zeroed is the identity).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.configs.model import ModelConfig
from jaxlm.metrics import param_count
from jaxlm.model.transformer import Transformer

SCORES = ("taylor", "magnitude")


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What stays: per layer, the kv groups and the MLP neurons (indices, ascending), and the
    layers (indices into the original model)."""

    kv_groups: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    layers: tuple[int, ...]


def _layers(config: ModelConfig, params: dict) -> list[dict]:
    """Each layer's parameter dict (scanned ones sliced out of the stack)."""
    if config.scan_layers:
        stack = params["layers"]
        return [jax.tree.map(lambda x, i=i: x[i], stack) for i in range(config.num_layers)]
    return [params[f"layers_{i}"] for i in range(config.num_layers)]


def _with_layers(config: ModelConfig, params: dict, layers: list[dict]) -> dict:
    out = {k: v for k, v in params.items() if not k.startswith("layers")}
    if config.scan_layers:
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
        out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return out


def check_prunable(config: ModelConfig) -> None:
    if config.moe.enabled:
        raise ValueError("pruning Mixture-of-Experts layers is not supported (model.moe)")
    if config.quant.stored:
        raise ValueError(
            f"this model is quantized (model.quant: {config.quant.describe()}); prune the float "
            "run, then quantize"
        )


def group_scores(
    config: ModelConfig, params: dict, grads: dict | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heads [L, K], neurons [L, F], layers [L]) importances: |Σ w g| with `grads`, else the
    L2 norm of the group's weights (one compiled program over the parameters where they are)."""
    heads, neurons, layers = _group_scores(config, params, grads)
    return np.asarray(heads), np.asarray(neurons), np.asarray(layers)


@functools.partial(jax.jit, static_argnums=0)
def _group_scores(config: ModelConfig, params: dict, grads: dict | None) -> tuple[jax.Array, ...]:
    g_ = config.num_groups
    n_layers, k_heads = config.num_layers, config.num_kv_heads

    def score(parts: Sequence[tuple[jax.Array, jax.Array | None]], axis_sums: Callable) -> Any:
        total = 0.0
        for w, g in parts:
            total = total + axis_sums(w * g if g is not None else jnp.square(w))
        return jnp.abs(total) if grads is not None else jnp.sqrt(total)

    heads, neurons, layers = [], [], []
    grad_layers = _layers(config, grads) if grads is not None else [None] * n_layers
    for blk, gblk in zip(_layers(config, params), grad_layers, strict=True):

        def pair(*path: str, blk: dict = blk, gblk: dict | None = gblk) -> tuple:
            w, g = blk, gblk
            for p in path:
                w = w[p]
                g = g[p] if g is not None else None
            return w, g

        attn, mlp = blk["attn"], blk["mlp"]
        # A kv group: its key/value heads, its G query heads and their output rows.
        by_head = []
        for name in ("query", "key", "value"):
            w, g = pair("attn", name, "w")  # [D, heads, H]
            x = (w * g if g is not None else jnp.square(w)).sum(axis=(0, 2))
            if "b" in attn[name]:
                b, gb = pair("attn", name, "b")
                x = x + (b * gb if gb is not None else jnp.square(b)).sum(axis=-1)
            by_head.append(x.reshape(k_heads, -1).sum(-1) if name == "query" else x)
        w, g = pair("attn", "out", "w")  # [N, H, D]
        x = (w * g if g is not None else jnp.square(w)).sum(axis=(1, 2))
        by_head.append(x.reshape(k_heads, g_).sum(-1))
        h = sum(by_head)
        heads.append(jnp.abs(h) if grads is not None else jnp.sqrt(h))
        # A neuron: its up (and gate) column, bias, and down row.
        f = 0.0
        for name in ("up", "gate") if config.gated else ("up",):
            w, g = pair("mlp", name, "w")  # [D, F]
            f = f + (w * g if g is not None else jnp.square(w)).sum(axis=0)
            if "b" in mlp[name]:
                b, gb = pair("mlp", name, "b")
                f = f + (b * gb if gb is not None else jnp.square(b))
        w, g = pair("mlp", "down", "w")  # [F, D]
        f = f + (w * g if g is not None else jnp.square(w)).sum(axis=1)
        neurons.append(jnp.abs(f) if grads is not None else jnp.sqrt(f))
        # A layer: every weight of the block.
        flat_w = jax.tree.leaves(blk)
        flat_g = jax.tree.leaves(gblk) if gblk is not None else [None] * len(flat_w)
        layers.append(score(list(zip(flat_w, flat_g, strict=True)), jnp.sum))
    return jnp.stack(heads), jnp.stack(neurons), jnp.stack(layers)


def _calibration_loss(config: ModelConfig, p: dict, b: dict) -> jax.Array:
    """The mean next-token cross-entropy of batch `b` (float32)."""
    logits = Transformer(config).apply(
        {"params": p}, b["tokens"], b["positions"], b["segment_ids"]
    )[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    mask = b["mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def calibration_grads(config: ModelConfig, params: dict, batches: Sequence[dict]) -> dict:
    """∂L/∂params of the mean next-token cross-entropy over `batches` (float32)."""
    grad = jax.jit(jax.grad(functools.partial(_calibration_loss, config)))
    total = None
    for b in batches:
        g = grad(params, b)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda x: x / len(batches), total)


def pruned_config(config: ModelConfig, kv_heads: int, mlp_dim: int, layers: int) -> ModelConfig:
    return dataclasses.replace(
        config,
        num_kv_heads=kv_heads,
        num_heads=kv_heads * config.num_groups,
        head_dim=config.head_dim,
        mlp_dim=mlp_dim,
        num_layers=layers,
    )


def sizes_for_target(
    config: ModelConfig, target: int, kinds: Sequence[str]
) -> tuple[int, int, int]:
    """(kv heads, MLP neurons, layers) kept, each the same fraction (of the `kinds` pruned) of
    the original, the largest model with at most `target` parameters."""
    check_prunable(config)
    now = param_count(config).total
    k, f, n = config.num_kv_heads, config.mlp_dim, config.num_layers
    floor = pruned_config(
        config, 1 if "heads" in kinds else k, 1 if "mlp" in kinds else f,
        1 if "layers" in kinds else n,
    )  # fmt: skip
    smallest = param_count(floor).total
    if not smallest <= target < now:
        raise ValueError(
            f"--target-params {target:,} must be below the model's {now:,} parameters and at "
            f"least {smallest:,} (one kv head, one neuron, one layer of the kinds pruned: "
            f"{', '.join(kinds)})"
        )

    def sizes(keep: float) -> tuple[int, int, int]:
        def one(kind: str, full: int) -> int:
            return max(1, math.floor(full * keep + 1e-9)) if kind in kinds else full

        return one("heads", k), one("mlp", f), one("layers", n)

    lo, hi = 0.0, 1.0  # bisect the kept fraction
    for _ in range(60):
        mid = (lo + hi) / 2
        if param_count(pruned_config(config, *sizes(mid))).total <= target:
            lo = mid
        else:
            hi = mid
    return sizes(lo)


def _largest_mlp(config: ModelConfig, target: int, kv_heads: int, layers: int) -> int:
    """The most MLP neurons that keep the model at or under `target` (0 if none fit)."""
    lo, hi = 0, config.mlp_dim
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if param_count(pruned_config(config, kv_heads, mid, layers)).total <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _spread(values: Sequence[int], most: int) -> list[int]:
    """At most `most` of `values` (ascending), evenly spaced, the largest always kept."""
    values = list(values)
    if len(values) <= most:
        return values
    if most <= 1:
        return values[-1:]
    picks = {values[round(i * (len(values) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)


def sizes_by_loss(
    config: ModelConfig,
    params: dict,
    target: int,
    kinds: Sequence[str],
    scores: tuple[np.ndarray, np.ndarray, np.ndarray],
    batches: Sequence[dict],
    max_candidates: int = 8,
) -> tuple[int, int, int]:
    """(kv heads, MLP neurons, layers) kept: of the sizes that fit `target` (for a number of kv
    heads and layers, the most neurons that fit; at most `max_candidates` such pairs, evenly
    spread), the one whose pruned model (each layer's best groups by `scores`) has the lowest
    loss on the calibration `batches`, measured. Heads and neurons are not worth the same on
    every model: one common fraction can remove heads a model needs while neurons it can spare
    stay, and summed first-order scores cannot tell (near a trained minimum the gradient is
    mostly noise)."""
    sizes_for_target(config, target, kinds)  # the target's checks
    k, n = config.num_kv_heads, config.num_layers
    heads_options = list(range(1, k + 1)) if "heads" in kinds else [k]
    layer_options = list(range(1, n + 1)) if "layers" in kinds else [n]
    per_axis = max(1, math.isqrt(max_candidates)) if len(layer_options) > 1 else max_candidates
    candidates = []
    for heads in _spread(heads_options, per_axis):
        for layers in _spread(layer_options, per_axis):
            mlp = config.mlp_dim
            if "mlp" in kinds:
                mlp = _largest_mlp(config, target, heads, layers)
            elif param_count(pruned_config(config, heads, mlp, layers)).total > target:
                mlp = 0
            if mlp >= 1:
                candidates.append((heads, mlp, layers))
    if len(candidates) == 1:
        return candidates[0]
    losses = []
    for sizes in candidates:
        small, pruned = apply_plan(config, params, plan_pruning(config, scores, *sizes))
        loss = jax.jit(functools.partial(_calibration_loss, small))
        losses.append(float(np.mean([float(loss(pruned, b)) for b in batches])))
    return candidates[int(np.argmin(losses))]


def plan_pruning(
    config: ModelConfig,
    scores: tuple[np.ndarray, np.ndarray, np.ndarray],
    kv_heads: int,
    mlp_dim: int,
    layers: int,
) -> PrunePlan:
    """Keep the best `kv_heads` groups and `mlp_dim` neurons of each layer, the best `layers`."""
    heads, neurons, layer = scores
    for name, value, full in (
        ("kv heads", kv_heads, config.num_kv_heads),
        ("MLP neurons", mlp_dim, config.mlp_dim),
        ("layers", layers, config.num_layers),
    ):
        if not 1 <= value <= full:
            raise ValueError(f"{name} kept={value} must be in [1, {full}]")
    if layers < config.num_layers and config.norm_position != "pre":
        raise ValueError("layers can be pruned from pre-LN models only (model.norm_position=pre)")

    def best(x: np.ndarray, n: int) -> tuple[int, ...]:
        return tuple(sorted(int(i) for i in np.argsort(-x, kind="stable")[:n]))

    return PrunePlan(
        kv_groups=tuple(best(h, kv_heads) for h in heads),
        neurons=tuple(best(f, mlp_dim) for f in neurons),
        layers=best(layer, layers),
    )


def apply_plan(config: ModelConfig, params: dict, plan: PrunePlan) -> tuple[ModelConfig, dict]:
    """(the smaller config, its parameters): the kept layers, in order, each with its kept kv
    groups (and their query heads) and neurons."""
    g = config.num_groups
    out_layers = []
    blocks = _layers(config, params)
    for li in plan.layers:
        blk = jax.tree.map(lambda x: x, blocks[li])
        kv = np.asarray(plan.kv_groups[li])
        q = np.asarray([h * g + j for h in kv for j in range(g)])
        attn = dict(blk["attn"])
        for name, idx in (("query", q), ("key", kv), ("value", kv)):
            part = dict(attn[name])
            part["w"] = part["w"][:, idx]
            if "b" in part:
                part["b"] = part["b"][idx]
            attn[name] = part
        attn["out"] = {**attn["out"], "w": attn["out"]["w"][q]}
        mlp = dict(blk["mlp"])
        f = np.asarray(plan.neurons[li])
        for name in ("up", "gate") if config.gated else ("up",):
            part = {**mlp[name], "w": mlp[name]["w"][:, f]}
            if "b" in part:
                part["b"] = part["b"][f]
            mlp[name] = part
        mlp["down"] = {**mlp["down"], "w": mlp["down"]["w"][f]}
        out_layers.append({**blk, "attn": attn, "mlp": mlp})
    (kv_heads,) = {len(plan.kv_groups[i]) for i in plan.layers}
    (mlp_dim,) = {len(plan.neurons[i]) for i in plan.layers}
    small = pruned_config(config, kv_heads, mlp_dim, len(plan.layers))
    return small, _with_layers(small, params, out_layers)


def prune_params(
    config: ModelConfig,
    params: dict,
    *,
    target_params: int | None = None,
    keep: dict[str, float] | None = None,
    kinds: Sequence[str] = ("heads", "mlp"),
    score: str = "taylor",
    batches: Sequence[dict] = (),
) -> tuple[ModelConfig, dict, PrunePlan]:
    """Prune to at most `target_params` (with calibration `batches`: the sizes of the `kinds`
    whose pruned model has the lowest calibration loss, `sizes_by_loss`; without: the `kinds`
    shrunk by one common fraction) or by the fractions kept per kind in `keep` ({"heads": 0.5,
    "mlp": 0.75, "layers": 1.0}); `score` "taylor" needs calibration `batches` (dicts with
    tokens, positions, segment_ids, targets, mask)."""
    check_prunable(config)
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not valid; choose one of {SCORES}")
    unknown = [k for k in kinds if k not in ("heads", "mlp", "layers")]
    if unknown or not kinds:
        raise ValueError(f"kinds={list(kinds)} must name some of 'heads', 'mlp', 'layers'")
    if (target_params is None) == (keep is None):
        raise ValueError("give a target size (target_params) or the fractions to keep (keep)")
    if target_params is not None:
        sizes_for_target(config, target_params, kinds)  # a bad target before any work
    else:
        bad = {k: v for k, v in keep.items() if k not in ("heads", "mlp", "layers")}
        if bad or any(not 0 < v <= 1 for v in keep.values()):
            raise ValueError(f"keep={keep} must map heads/mlp/layers to fractions in (0, 1]")
        full = (config.num_kv_heads, config.mlp_dim, config.num_layers)
        sizes = tuple(
            max(1, math.floor(n * keep.get(kind, 1.0) + 1e-9))
            for kind, n in zip(("heads", "mlp", "layers"), full, strict=True)
        )
        if sizes == full:
            raise ValueError(f"keep={keep} removes nothing from this model")
    if score == "taylor" and not batches:
        raise ValueError("score='taylor' needs calibration batches")
    grads = calibration_grads(config, params, batches) if score == "taylor" else None
    scores = group_scores(config, params, grads)
    if target_params is not None:
        sizes = (
            sizes_by_loss(config, params, target_params, kinds, scores, batches)
            if batches
            else sizes_for_target(config, target_params, kinds)
        )
    plan = plan_pruning(config, scores, *sizes)
    small, pruned = apply_plan(config, params, plan)
    return small, pruned, plan


def prune_workdir(
    workdir: str | Path,
    out: str | Path,
    *,
    target_params: int | None = None,
    keep: dict[str, float] | None = None,
    kinds: Sequence[str] = ("heads", "mlp"),
    score: str = "taylor",
    calibration_batches: int = 8,
    step: int | None = None,
) -> tuple[Path, PrunePlan]:
    """Prune the run at `workdir` into a new run `out` (a step-0 checkpoint of the smaller model
    with the source's data, optimizer and tokenizer: `jaxlm train --workdir OUT` fine-tunes it).
    LoRA adapters are merged first; the calibration batches are the first ones of the run's
    training data. Refusals come before anything is written."""
    from jaxlm import checkpoint
    from jaxlm.data import to_global
    from jaxlm.interop.workdir import write_workdir
    from jaxlm.model.lora import merge_lora
    from jaxlm.run import RunPlan, load_for_eval

    saved = checkpoint.load_run_config(workdir)
    check_prunable(saved.model)
    if target_params is not None:
        sizes_for_target(saved.model, target_params, kinds)  # a bad target before the load
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches={calibration_batches} must be >= 1")
    out = Path(out).absolute()
    if checkpoint.complete_steps(out) or (out / checkpoint.CONFIG_FILE).exists():
        raise ValueError(f"--out {str(out)!r} already holds a jaxlm run; give a new directory")
    config, mesh, params, tokenizer = load_for_eval(workdir, step)
    model, params = merge_lora(config.model, params)
    config = dataclasses.replace(config, model=model)
    batches = []
    if score == "taylor" or target_params is not None:  # scores; sizes chosen by their loss
        plan = RunPlan(config, mesh=mesh, tokenizer=tokenizer)
        it = plan.make_iterator()
        keys = ("tokens", "positions", "segment_ids", "targets", "mask")
        for _ in range(calibration_batches):
            batch = to_global(next(it), mesh)
            batches.append({k: batch[k] for k in keys})
    small, pruned, prune_plan = prune_params(
        model, params, target_params=target_params, keep=keep, kinds=kinds, score=score,
        batches=batches,
    )  # fmt: skip
    del params
    run = dataclasses.replace(config, model=small)
    path = write_workdir(
        out, small, lambda mesh, rules: pruned, run_config=run, mesh=mesh,
        rules=config.mesh.rules, tokenizer=tokenizer,
    )  # fmt: skip
    return path, prune_plan
