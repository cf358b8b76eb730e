"""Sweeps: named training runs (model sizes x token or FLOP budgets) run in sequence, resumably,
with one results table (N, D, C, final eval loss) for the scaling-law fits."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlm import checkpoint, storage
from jaxlm.configs.model import ModelConfig
from jaxlm.configs.overrides import apply_overrides, call_user_function, load_python_file
from jaxlm.configs.run import RunConfig
from jaxlm.files import read_json, read_text
from jaxlm.metrics import flops_per_token, param_count

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
TEXT_COLUMNS = ("name", "parametrization")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep; `budget` labels the IsoFLOP budget (FLOPs) it belongs to.

    `branch_of`: the name of an earlier run of the sweep whose checkpoint at
    `config.train.branch_from_step` this one continues (`train.branch_from` is set to that run's
    directory when the sweep runs). `results=False`: trained, but not a row of the results
    table (a cooldown study's constant-learning-rate trunk)."""

    name: str
    config: RunConfig
    budget: float | None = None
    branch_of: str | None = None
    results: bool = True


def tokens_per_step(config: RunConfig) -> int:
    return config.data.batch_size * config.data.seq_len


def run_size(config: RunConfig) -> dict[str, Any]:
    """N (parameters, with and without embeddings), D (training tokens) and C of a run.

    `flops` is the scaling-law convention C = 6 N D (N = all parameters, as in Hoffmann et al.;
    for MoE the active ones), which the fits assume; `flops_model` is jaxlm's fuller count
    (attention scores included, embedding lookups not), the one MFU uses.
    """
    counts = param_count(config.model)
    tokens = config.train.steps * tokens_per_step(config)
    return {
        "params": counts.total,
        "params_non_embedding": counts.non_embedding,
        "params_active": counts.active,
        "tokens": tokens,
        "flops": 6.0 * counts.active * tokens,
        "flops_model": flops_per_token(config.model, config.data.seq_len) * tokens,
    }


def _with_steps(base: RunConfig, model: ModelConfig, steps: int) -> RunConfig:
    return dataclasses.replace(
        base, model=model, train=dataclasses.replace(base.train, steps=steps)
    )


def token_grid(
    base: RunConfig, models: Mapping[str, ModelConfig], tokens: Sequence[float]
) -> list[SweepRun]:
    """Every model trained on every token budget (steps rounded up to whole batches)."""
    runs = []
    for d in tokens:
        if not d > 0:
            raise ValueError(f"token budget {d!r} must be > 0")
        steps = max(1, math.ceil(d / tokens_per_step(base)))
        for name, model in models.items():
            runs.append(SweepRun(f"{name}_D{d:.3g}", _with_steps(base, model, steps)))
    return runs


def isoflop_grid(
    base: RunConfig,
    models: Mapping[str, ModelConfig],
    budgets: Sequence[float],
    *,
    min_steps: int = 10,
) -> list[SweepRun]:
    """For each FLOP budget C, every model trained for C / (6 N) tokens (Chinchilla approach 2;
    N = active parameters).

    Models that would train fewer than `min_steps` steps at a budget are left out of it (too big
    for that budget to say anything).
    """
    runs = []
    per_step = tokens_per_step(base)
    for c in budgets:
        if not c > 0:
            raise ValueError(f"FLOP budget {c!r} must be > 0")
        for name, model in models.items():
            n = param_count(model).active
            steps = round(c / (6 * n * per_step))
            if steps >= min_steps:
                runs.append(SweepRun(f"C{c:.3g}_{name}", _with_steps(base, model, steps), c))
    if not runs:
        raise ValueError(
            f"no model trains >= {min_steps} steps within budgets {list(budgets)}; "
            "raise the budgets or use smaller models"
        )
    return runs


def cooldown_grid(
    base: RunConfig,
    models: Mapping[str, ModelConfig],
    tokens: Sequence[float],
    *,
    decay_fraction: float = 0.2,
    decay: str = "linear",
) -> list[SweepRun]:
    """The loss of every model at every token count from one constant-learning-rate run per
    model and a short cooldown per token count (Hägele et al. 2024), instead of one full run
    per point.

    For D tokens (S steps, rounded up to whole batches) the cooldown branches from the trunk's
    checkpoint at S0 = round(S (1 - decay_fraction)) and decays the learning rate to
    `optim.min_lr_ratio` of its peak over steps S0..S (`decay`: "linear" or "1-sqrt"): the
    warmup-stable-decay schedule of a run of S steps, without training its stable part again.
    Runs: `<model>_stable` (constant rate, `base`'s warmup, checkpoints kept at every S0; not a
    results row) then `<model>_D<tokens>` for each D, whose rows have the usual N, D, C (C =
    6 N D: the compute of the point, as if trained alone) and `flops_trained` (what the branch
    itself trained).
    """
    if not 0 < decay_fraction < 1:
        raise ValueError(f"decay_fraction={decay_fraction!r} must be in (0, 1)")
    if not tokens:
        raise ValueError("cooldown_grid needs at least one token count")
    per_step = tokens_per_step(base)
    points = []
    for d in sorted(tokens):
        if not (isinstance(d, int | float) and 0 < d < math.inf):
            raise ValueError(f"token count {d!r} must be a finite number > 0")
        steps = max(1, math.ceil(d / per_step))
        branch = round(steps * (1 - decay_fraction))
        if not base.optim.warmup_steps < branch < steps:
            raise ValueError(
                f"token count {d:g} is {steps} steps of {per_step} tokens: its cooldown would "
                f"start at step {branch}, which must be after the warmup "
                f"(optim.warmup_steps={base.optim.warmup_steps}) and before step {steps}; use "
                "more tokens or another decay_fraction"
            )
        points.append((d, steps, branch))
    trunk_steps = max(b for _, _, b in points)
    runs = []
    for name, model in models.items():
        trunk = apply_overrides(
            _with_steps(base, model, trunk_steps),
            [
                "optim.schedule=constant",
                f"checkpoint.keep_steps={','.join(str(b) for _, _, b in points)}",
            ],
        )
        runs.append(SweepRun(f"{name}_stable", trunk, results=False))
        for d, steps, branch in points:
            config = apply_overrides(
                _with_steps(base, model, steps),
                [
                    "optim.schedule=wsd",
                    f"optim.wsd_decay={decay}",
                    f"optim.decay_fraction={(steps - branch) / steps!r}",
                    f"train.branch_from_step={branch}",  # of the trunk; run_sweep says where
                ],
            )
            runs.append(SweepRun(f"{name}_D{d:.3g}", config, branch_of=f"{name}_stable"))
    return runs


def lr_grid(
    base: RunConfig,
    widths: Sequence[int],
    learning_rates: Sequence[float],
    parametrizations: Sequence[str] = ("sp", "mup"),
) -> list[SweepRun]:
    """Every width (`model.d_model`, derived dims re-derived) at every learning rate under each
    parametrization, named `<parametrization>_w<width>_lr<lr>`: the learning-rate transfer
    study (`best_learning_rates`, `plot_lr_transfer`). `model.mup_base_width` (default: the
    narrowest width) is the base the muP runs are relative to."""
    if not widths or not learning_rates:
        raise ValueError("lr_grid needs at least one width and one learning rate")
    for lr in learning_rates:
        if not (isinstance(lr, int | float) and 0 < lr < math.inf):
            raise ValueError(f"learning rate {lr!r} must be a finite number > 0")
    base_width = base.model.mup_base_width or min(widths)
    if base_width > min(widths):
        raise ValueError(
            f"model.mup_base_width={base_width} is larger than the narrowest width "
            f"{min(widths)}; the base must be at most every width of the grid"
        )
    runs = []
    for p in parametrizations:
        for width in widths:
            for lr in learning_rates:
                config = apply_overrides(
                    base,
                    [
                        f"model.d_model={width}",
                        f"model.parametrization={p}",
                        f"model.mup_base_width={base_width}",
                        f"optim.learning_rate={lr}",
                    ],
                )
                runs.append(SweepRun(f"{p}_w{width}_lr{lr:g}", config))
    return runs


def best_learning_rates(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, dict]]:
    """parametrization -> width -> {"learning_rate", "eval_loss"} of the row with the lowest
    finite eval loss, from a results table of an `lr_grid` sweep."""
    best: dict[str, dict[int, dict]] = {}
    for row in rows:
        loss = row["eval_loss"]
        if loss is None or not math.isfinite(loss):
            continue
        at = best.setdefault(str(row["parametrization"]), {})
        width = int(row["d_model"])
        if width not in at or loss < at[width]["eval_loss"]:
            at[width] = {"learning_rate": row["learning_rate"], "eval_loss": loss}
    return {p: dict(sorted(w.items())) for p, w in best.items()}


def load_sweep(path: str | Path) -> list[SweepRun]:
    """The runs a sweep file defines: `SWEEP` (a list) or `get_sweep()` returning one."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"sweep file {str(path)!r} is not an existing .py file")
    module = load_python_file(path)
    if hasattr(module, "get_sweep"):
        runs = call_user_function(path, module.get_sweep)
    elif hasattr(module, "SWEEP"):
        runs = module.SWEEP
    else:
        raise ValueError(f"sweep file {str(path)!r} must define get_sweep() or SWEEP")
    return check_runs(runs)


def check_runs(runs: Iterable[SweepRun]) -> list[SweepRun]:
    """The runs as a list, refusing non-`SweepRun`s, unusable or repeated names."""
    runs = list(runs)
    if not runs:
        raise ValueError("the sweep has no runs")
    seen: set[str] = set()
    for i, run in enumerate(runs):
        if not isinstance(run, SweepRun):
            raise TypeError(f"sweep entry {i} is a {type(run).__name__}, expected SweepRun")
        if not _NAME.match(run.name):
            raise ValueError(
                f"run name {run.name!r} must be letters, digits, '.', '_', '+' or '-' (it names a "
                "directory)"
            )
        if run.name in seen:
            raise ValueError(f"run name {run.name!r} appears twice in the sweep")
        if run.branch_of is not None and run.branch_of not in seen:
            raise ValueError(
                f"run {run.name!r} branches from {run.branch_of!r}, which is not an earlier run "
                "of the sweep"
            )
        if run.branch_of is not None:
            step = run.config.train.branch_from_step
            trunk = next(r.config for r in runs if r.name == run.branch_of)
            if step is None:
                raise ValueError(
                    f"run {run.name!r} branches from {run.branch_of!r}: set its "
                    "train.branch_from_step (the checkpoint it continues)"
                )
            if step > trunk.train.steps:
                raise ValueError(
                    f"run {run.name!r} branches at step {step}, beyond its trunk "
                    f"{run.branch_of!r} (train.steps={trunk.train.steps})"
                )
            if step not in (*trunk.checkpoint.kept_steps, trunk.train.steps):
                raise ValueError(
                    f"run {run.name!r} branches at step {step}, which its trunk "
                    f"{run.branch_of!r} does not keep: add it to the trunk's "
                    f"checkpoint.keep_steps={trunk.checkpoint.keep_steps!r}"
                )
        budget = run.budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not 0 < budget < math.inf
        ):
            raise ValueError(
                f"run {run.name!r}: budget={budget!r} must be a finite number of FLOPs > 0, or None"
            )
        seen.add(run.name)
    return runs


def _final_eval(workdir: storage.AnyPath, steps: int) -> dict[str, float] | None:
    """The eval record at the last step, if the run finished (its final checkpoint exists)."""
    if steps not in checkpoint.complete_steps(workdir):
        return None
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        record = json.loads(line)
        if record.get("step") == steps and "eval_loss" in record:
            return record
    return None


def _row(run: SweepRun, record: Mapping[str, Any]) -> dict[str, Any]:
    c = run.config
    size = run_size(c)
    start = c.train.branch_from_step if run.branch_of is not None else 0
    return {
        "name": run.name,
        "budget": run.budget,
        **size,
        "flops_trained": size["flops"] * (c.train.steps - start) / c.train.steps,
        "eval_loss": record["eval_loss"],
        "eval_bits_per_byte": record.get("eval_bits_per_byte"),
        "steps": c.train.steps,
        "seq_len": c.data.seq_len,
        "batch_size": c.data.batch_size,
        "d_model": c.model.d_model,
        "num_layers": c.model.num_layers,
        "learning_rate": c.optim.learning_rate,
        "parametrization": c.model.parametrization,
    }


def write_results(workdir: str | Path, rows: Sequence[Mapping[str, Any]]) -> storage.AnyPath:
    """`results.json` and `results.csv` in `workdir` (on disk or gs://; each written
    atomically)."""
    workdir = storage.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(workdir / RESULTS_JSON, json.dumps(list(rows), indent=1) + "\n")
    if rows:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        storage.write_text_atomic(workdir / RESULTS_CSV, table.getvalue())
    return workdir / RESULTS_JSON


def _csv_row(row: dict[str, str], path: storage.AnyPath, line: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k is None or v is None:
            raise ValueError(f"{path}:{line}: the row has another number of cells than the header")
        try:
            out[k] = None if v == "" else v if k in TEXT_COLUMNS else float(v)
        except ValueError:
            raise ValueError(f"{path}:{line}: column {k!r} holds {v!r}, not a number") from None
    return out


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results table (`results.json`, `results.csv`, or a sweep directory)."""
    path = storage.as_path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no results table at {str(path)!r}")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
        return [_csv_row(r, path, i + 2) for i, r in enumerate(rows)]
    rows = read_json(path, expect=list, what="a results table: a list of one object per run")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected an object")
    return rows


def run_sweep(
    runs: Iterable[SweepRun],
    workdir: str | Path,
    *,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    train_fn: Callable[[RunConfig, Any], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every run in `workdir/<name>` in order and return (and write) the results table.

    Finished runs are skipped, unfinished ones resume from their newest checkpoint, so rerunning
    a sweep after a crash or kill continues it. `overrides` (`key=value`) apply to every run.
    """
    workdir = storage.as_path(workdir)

    def configured(run: SweepRun) -> SweepRun:
        extra = [] if run.branch_of is None else [f"train.branch_from={workdir / run.branch_of}"]
        return dataclasses.replace(run, config=apply_overrides(run.config, [*overrides, *extra]))

    runs = [configured(r) for r in check_runs(runs)]
    if train_fn is None:
        from jaxlm.loop import train as train_fn
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(runs):
        run_dir = workdir / run.name
        size = run_size(run.config)
        record = _final_eval(run_dir, run.config.train.steps)
        if record is None:
            log(
                f"sweep {i + 1}/{len(runs)}: {run.name} (N={size['params']:,}, "
                f"D={size['tokens']:,}, C={size['flops']:.3g})"
            )
            train_fn(run.config, run_dir)
            record = _final_eval(run_dir, run.config.train.steps)
            if record is None:  # stopped by a signal: the sweep stops too
                log(f"sweep: {run.name} did not finish; rerun the sweep to continue it")
                break
        else:
            log(f"sweep {i + 1}/{len(runs)}: {run.name} done (eval loss {record['eval_loss']:.4f})")
        if run.results:
            rows.append(_row(run, record))
            write_results(workdir, rows)
    return rows
