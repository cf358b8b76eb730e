"""Model compression on trained models: bytes, held-out loss, greedy agreement and decode speed
of float32, bfloat16, int8, int4 (g128), the int8 KV cache, QAT int4, a distilled student and
pruned-then-fine-tuned models, against the float32 model they came from.

For each `--models` entry a float run is trained under `--root` (kept: a rerun reuses it):
`default` is the default `jaxlm train` job (the "small" model, 1500 steps on the standard-library
corpus); `ladder-0` is that scaling-ladder preset (byte vocabulary) trained briefly on the same
corpus (`smoke`: the default job for 20 steps, to check the script quickly). Then, per model:

- `bfloat16`, `int8`, `int4_g128`: the float parameters cast / quantized in memory (post-training).
- `kv_int8`: the float weights with `model.kv_cache_dtype=int8`. Its loss is measured through
  the cache: the first half of each held-out row is prefilled into the cache and the second half
  scored on it (`kv_loss`, also given for float32's own cache, which must equal its plain
  forward pass).
Fine-tunes run `--tune-frac` of the float run's steps at `--tune-lr-scale` times its peak learning
rate (a tenth of them warmup), with a fresh optimizer.

- `qat_int4`: the float run fine-tuned for `--tune-frac` of its steps with `model.quant`
  (int4 g128, `qat=true`) and then stored int4; `ft_ptq_int4`: the same fine-tune without QAT,
  quantized after it (what QAT must beat).
- `distilled` / `student_alone`: a smaller student (`--student`) trained for `--student-steps`
  with `task.kind=distill` from the float run, and alone on the same batches.
- `pruned_75`, `pruned_50`: `jaxlm prune --target-params` (75% / 50% of the parameters, Taylor
  scores, sizes chosen by calibration loss), then fine-tuned for `--tune-frac` of the original
  steps with the normal trainer; `pruned_75_kd`, `pruned_50_kd`: the same fine-tune distilled
  from the float model (`task.kind=distill`).

Each row: stored bytes, held-out loss (nats per byte) and perplexity and their ratio to float32,
greedy agreement with the float32 model over `--agree-tokens` new tokens from held-out prompts
(fraction of equal tokens; mean length of the equal prefix), and decode tokens/s at batch 1
(median of `--rounds` rounds, the variants interleaved within each round). `targets` checks
the issue's bounds. One JSON object per model, one line each, then one with all of them.

    python experiments/bench/compress.py --root /tmp/compress [--models default,ladder-0]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, loop, sample, sharding
from jaxlm.compress.prune import prune_workdir
from jaxlm.compress.quantize import quantize_params, quantize_workdir, stored_bytes
from jaxlm.configs import default_job
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.configs.quant import QuantConfig
from jaxlm.data import to_global
from jaxlm.evals.card import decode_speed
from jaxlm.metrics import param_count
from jaxlm.model.kv_cache import init_cache
from jaxlm.model.transformer import Transformer
from jaxlm.run import RunPlan, load_for_eval

INT8 = QuantConfig(bits=8, embed=True)
INT4 = QuantConfig(bits=4, group=128, embed=True)
MODELS = {
    "default": lambda: default_job(),
    "ladder-0": lambda: load_config(
        "ladder-0",
        [
            "model.vocab_size=320",
            "model.max_seq_len=512",
            "train.steps=400",
            "optim.warmup_steps=40",
        ],
    ),
}
MODELS["smoke"] = lambda: apply_overrides(default_job(), ["train.steps=20"])  # a quick check
STUDENTS = {  # a student about a quarter of its teacher's non-embedding size
    "default": [
        "model.d_model=64",
        "model.num_kv_heads=2",
        "model.num_heads=2",
        "model.mlp_dim=192",
    ],
    "smoke": ["model.d_model=64", "model.num_kv_heads=2", "model.num_heads=2", "model.mlp_dim=192"],
    "ladder-0": [
        "model.d_model=128",
        "model.num_kv_heads=2",
        "model.num_heads=2",
        "model.mlp_dim=384",
    ],
}


def _log(message: str) -> None:
    print(f"[compress] {message}", flush=True)


def _train(config: Any, workdir: Path) -> Path:
    """Train `config` into `workdir` unless it already holds its last step."""
    steps = checkpoint.complete_steps(workdir)
    if not steps or steps[-1] < config.train.steps:
        start = time.perf_counter()
        loop.train(config, workdir)
        _log(f"trained {workdir.name} in {time.perf_counter() - start:.0f} s")
    return workdir


def _with_steps(config: Any, steps: int, lr_scale: float = 1.0, **train: Any) -> Any:
    """`config` for `steps` steps (warmup a tenth of them, peak learning rate times
    `lr_scale`), evaluated and saved at the end only."""
    return dataclasses.replace(
        config,
        train=dataclasses.replace(
            config.train, steps=steps, eval_every=steps, sample_tokens=0, **train
        ),
        optim=dataclasses.replace(
            config.optim,
            warmup_steps=max(1, steps // 10),
            learning_rate=config.optim.learning_rate * lr_scale,
        ),
        checkpoint=dataclasses.replace(config.checkpoint, every=steps, async_save=False),
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _cached_nll(params: Any, tokens_BT: jax.Array, model: Any) -> jax.Array:
    """Mean next-token loss on the second half of each row, predicted through a KV cache that
    holds the first half (prefilled) and is extended by the second half."""
    b, t = tokens_BT.shape
    half = t // 2
    net = Transformer(model)
    positions = jnp.broadcast_to(jnp.arange(half, dtype=jnp.int32), (b, half))
    last_B1V, cache, _ = net.apply(
        {"params": params},
        tokens_BT[:, :half],
        positions,
        cache=init_cache(model, b, t),
        prefill=True,
        logits_at=jnp.full((b, 1), half - 1, jnp.int32),
    )
    logits_BTV, _, _ = net.apply({"params": params}, tokens_BT[:, half:-1], cache=cache)
    logits_BTV = jnp.concatenate([last_B1V, logits_BTV], axis=1).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits_BTV, axis=-1)
    return -jnp.take_along_axis(logp, tokens_BT[:, half:, None], axis=-1).mean()


@dataclasses.dataclass
class Variant:
    name: str
    config: Any  # RunConfig
    params: Any
    row: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode: list[float] = dataclasses.field(default_factory=list)


def _held_out(config: Any, mesh: Any, tokenizer: Any, batches: int) -> list[dict]:
    plan = RunPlan(config, mesh=mesh, tokenizer=tokenizer)
    it = plan.make_iterator(split=config.data.eval_split, num_epochs=1)
    return [to_global(b, mesh) for b in (next(it) for _ in range(batches))]


def _measure(
    v: Variant,
    mesh: Any,
    tokenizer: Any,
    eval_batches: int,
    held: list[dict],
    prompts: list[list[int]],
    new: int,
) -> list[list[int]]:
    plan = RunPlan(v.config, mesh=mesh, tokenizer=tokenizer)
    loss = loop.evaluate(plan, v.params, max_batches=eval_batches)["eval_loss"]
    model = v.config.model
    with sharding.use_mesh(mesh, v.config.mesh.rules):
        kv = [float(_cached_nll(v.params, b["tokens"], model)) for b in held]
        out = sample.generate(model, v.params, prompts, new, pad_id=tokenizer.pad_id)
    v.row.update(
        bytes=stored_bytes(v.params),
        params=param_count(model).total,
        loss=round(loss, 5),
        ppl=round(math.exp(loss), 4),
        kv_loss=round(float(np.mean(kv)), 5),
    )
    return out


def _agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    equal, prefix = [], []
    for r, g in zip(ref, got, strict=True):
        n = min(len(r), len(g))
        same = [a == b for a, b in zip(r[:n], g[:n], strict=True)]
        equal.append(sum(same) / max(len(r), 1))
        prefix.append(next((i for i, s in enumerate(same) if not s), n))
    return {
        "greedy_equal_frac": round(float(np.mean(equal)), 4),
        "greedy_equal_prefix": round(float(np.mean(prefix)), 1),
    }


def bench_model(name: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    base_config = MODELS[name]()
    steps = base_config.train.steps
    tune = max(1, round(args.tune_frac * steps))
    float_dir = _train(base_config, root / name / "float")
    config, mesh, params, tokenizer = load_for_eval(float_dir)
    model = config.model
    variants = [Variant("float32", config, params)]

    def with_model(**changes: Any) -> Any:
        return dataclasses.replace(config, model=dataclasses.replace(model, **changes))

    bf16 = with_model(dtype="bfloat16", param_dtype="bfloat16")
    variants.append(
        Variant("bfloat16", bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    )
    for vname, fmt in (("int8", INT8), ("int4_g128", INT4)):
        qmodel, qparams = quantize_params(model, params, fmt, mesh=mesh, rules=config.mesh.rules)
        variants.append(Variant(vname, dataclasses.replace(config, model=qmodel), qparams))
    variants.append(Variant("kv_int8", with_model(kv_cache_dtype="int8"), params))

    # QAT int4 against the same fine-tune quantized afterwards.
    for vname, quant in (
        ("qat_int4", dataclasses.replace(INT4, qat=True)),
        ("ft_ptq_int4", QuantConfig()),
    ):
        run = root / name / f"{vname}_ft"
        tuned = dataclasses.replace(
            _with_steps(config, tune, args.tune_lr_scale, init_from=str(float_dir)),
            model=dataclasses.replace(model, quant=quant),
        )
        _train(tuned, run)
        out = root / name / vname
        if not checkpoint.complete_steps(out):
            quantize_workdir(run, out, INT4)
        vconfig, _, vparams, _ = load_for_eval(out)
        variants.append(Variant(vname, vconfig, vparams))

    # A smaller student, distilled from the float model and alone on the same batches.
    student = apply_overrides(_with_steps(config, args.student_steps), STUDENTS[name])
    distill_sets = [
        "task.kind=distill",
        f"task.teacher={float_dir}",
        f"task.distill_alpha={args.distill_alpha}",
    ]
    taught = apply_overrides(student, distill_sets)
    for vname, run_config in (("student_alone", student), ("distilled", taught)):
        run = _train(run_config, root / name / vname)
        vconfig, _, vparams, _ = load_for_eval(run)
        variants.append(Variant(vname, vconfig, vparams))

    # Pruned to 75% and 50% of the parameters, then fine-tuned for tune_frac of the steps: with
    # the data alone, and distilled from the float model (the same steps and batches).
    total = sum(x.size for x in jax.tree.leaves(params))
    for frac in (0.75, 0.5):
        pruned = root / name / f"pruned_{round(frac * 100)}_step0"
        if not checkpoint.complete_steps(pruned):
            prune_workdir(float_dir, pruned, target_params=int(frac * total))
        start = checkpoint.load_run_config(pruned)
        loss = loop.eval_workdir(pruned, max_batches=args.eval_batches)["eval_loss"]
        for how, sets in (("", []), ("_kd", distill_sets)):
            tuned = _with_steps(start, tune, args.tune_lr_scale, init_from=str(pruned))
            run = _train(
                apply_overrides(tuned, sets), root / name / f"pruned_{round(frac * 100)}{how}"
            )
            vconfig, _, vparams, _ = load_for_eval(run)
            variants.append(
                Variant(run.name, vconfig, vparams, {"loss_before_fine_tune": round(loss, 5)})
            )

    held = _held_out(config, mesh, tokenizer, 2)
    window = model.max_seq_len
    new = min(args.agree_tokens, window - args.prompt_tokens)
    rows = held[0]["tokens"]
    prompts = [list(map(int, np.asarray(rows[i, : args.prompt_tokens]))) for i in range(8)]
    outputs = {}
    for v in variants:
        _log(f"{name}: measuring {v.name}")
        outputs[v.name] = _measure(v, mesh, tokenizer, args.eval_batches, held, prompts, new)
    for _ in range(args.rounds):  # decode speed, interleaved
        for v in variants:
            v.decode.append(
                decode_speed(v.config, v.params, tokenizer, mesh)["decode_tokens_per_s"]
            )

    ref = variants[0].row
    table = {}
    for v in variants:
        row = v.row
        row.update(_agreement(outputs["float32"], outputs[v.name]))
        row["bytes_vs_float32"] = round(row["bytes"] / ref["bytes"], 4)
        row["ppl_vs_float32"] = round(row["ppl"] / ref["ppl"], 4)
        row["kv_ppl_vs_float32"] = round(math.exp(row["kv_loss"] - ref["kv_loss"]), 4)
        row["decode_tok_s"] = round(statistics.median(v.decode), 1)
        row["decode_vs_float32"] = round(
            statistics.median(v.decode) / statistics.median(variants[0].decode), 3
        )
        table[v.name] = row
    targets = {
        "int8_ppl_within_1pct": table["int8"]["ppl_vs_float32"] <= 1.01,
        "int8_bytes_about_25pct": table["int8"]["bytes_vs_float32"] <= 0.26,
        "int4_g128_ppl_within_5pct": table["int4_g128"]["ppl_vs_float32"] <= 1.05,
        "kv_int8_ppl_within_0.5pct": table["kv_int8"]["kv_ppl_vs_float32"] <= 1.005,
        "qat_int4_beats_ptq_int4": table["qat_int4"]["loss"] < table["ft_ptq_int4"]["loss"],
        "distilled_beats_alone": table["distilled"]["loss"] < table["student_alone"]["loss"],
        "pruned_75_ppl_within_5pct": table["pruned_75"]["ppl_vs_float32"] <= 1.05,
        "pruned_75_kd_ppl_within_5pct": table["pruned_75_kd"]["ppl_vs_float32"] <= 1.05,
    }
    return {
        "model": name,
        "float_steps": steps,
        "fine_tune_steps": tune,
        "student_steps": args.student_steps,
        "eval_tokens": args.eval_batches * config.data.batch_size * config.data.seq_len,
        "agree_new_tokens": new,
        "device": jax.devices()[0].device_kind,
        "targets": targets,
        "table": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="where the runs are trained and kept")
    parser.add_argument("--models", default="default,ladder-0")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--tune-frac", type=float, default=0.1)
    parser.add_argument("--tune-lr-scale", type=float, default=0.3)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--distill-alpha", type=float, default=0.9)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--agree-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    root = Path(args.root)
    reports = []
    for name in names:
        reports.append(bench_model(name, root, args))
        print(json.dumps(reports[-1]), flush=True)
    print(json.dumps({"models": reports}))


if __name__ == "__main__":
    main()
