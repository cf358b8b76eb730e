"""Which layout fits, before paying for the pod: train steps compiled ahead of time for a TPU
topology from any machine with libtpu (the `tpu` extra), no chips needed (`jaxlm plan`).

For a run config and a topology (one slice, or several joined by the data-center network), the
candidates are the mesh shapes that divide the model, the batch and the chips -- fsdp with
tensor, expert, pipeline (`stage`) and, for long sequences, context axes within a slice; the
slices as data, fsdp or stage -- times the remat policies. Each candidate's state (parameters
and optimizer) per chip is known from its shardings without compiling; one whose state alone
exceeds the chip's HBM is out. The others are compiled (in parallel threads): per chip, the
bytes of the arguments and temporaries from `memory_analysis()`, and the bytes each collective
sends, read from the compiled program (loops multiplied out by their trip counts; ICI from the
collective ops, DCN from the transfers to other slices). A roofline estimate of the step time --
the chip's FLOPs at peak (`step_flops`: the model's FLOPs, the forward that remat recomputes,
the pipeline bubble) plus ICI bytes at the ICI bandwidth plus DCN bytes at the DCN bandwidth,
nothing overlapped -- ranks the layouts that fit; the fastest is recommended. The chip figures
are Cloud TPU's published per-chip numbers; DCN is taken as 6.25 GB/s per chip (50 Gbps), an
assumption to adjust for a given pod. The estimate ranks layouts; it does not predict MFU.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from jaxlm import platforms, sharding
from jaxlm.configs.model import PLAN_REMATS
from jaxlm.configs.overrides import apply_overrides
from jaxlm.configs.run import RunConfig
from jaxlm.hlo import collective_bytes
from jaxlm.model import pipeline

GIB = 2.0**30
DCN_BYTES_PER_S = 6.25e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's published figures: HBM bytes, dense bfloat16 FLOP/s, ICI bytes/s."""

    name: str
    hbm_bytes: float
    peak_flops: float
    ici_bytes_per_s: float


# By the start of `device.device_kind` (v5e reports "TPU v5 lite", v5p "TPU v5"): first match.
CHIPS: tuple[tuple[str, Chip], ...] = (
    ("TPU v4", Chip("v4", 32 * GIB, 275e12, 300e9)),
    ("TPU v5 lite", Chip("v5e", 16 * GIB, 197e12, 200e9)),
    ("TPU v5e", Chip("v5e", 16 * GIB, 197e12, 200e9)),
    ("TPU v5p", Chip("v5p", 95 * GIB, 459e12, 600e9)),
    ("TPU v5", Chip("v5p", 95 * GIB, 459e12, 600e9)),
    ("TPU v6 lite", Chip("v6e", 32 * GIB, 918e12, 448e9)),
    ("TPU v6e", Chip("v6e", 32 * GIB, 918e12, 448e9)),
)


def chip_of(device: Any) -> Chip:
    """The `Chip` figures of `device` (a TPU topology's device)."""
    for prefix, chip in CHIPS:
        if device.device_kind.startswith(prefix):
            return chip
    known = sorted({c.name for _, c in CHIPS})
    raise ValueError(f"no figures for device kind {device.device_kind!r}; known chips: {known}")


def topology_devices(topology: str, slices: int = 1) -> list[Any]:
    """The devices of `slices` x TPU topology `topology`, or a clear error for a name libtpu
    does not know."""
    if not isinstance(slices, int) or slices < 1:
        raise ValueError(f"--slices {slices!r} must be an integer >= 1")
    try:
        return list(platforms.tpu_topology(topology, slices).devices)
    except Exception as e:  # libtpu's errors vary by version; say what was asked for
        raise ValueError(
            f"cannot describe TPU topology {topology!r} (e.g. 'v5p:2x2x1', 'v5e:4x4'); "
            f"is jax[tpu] installed? ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def lower_train_step(plan: Any) -> Any:
    """`plan`'s train step (a `RunPlan`) lowered for its mesh's devices, from abstract values."""
    with sharding.use_mesh(plan.mesh, plan.rules):
        return plan.train_step.jitted.lower(plan.abstract_state, plan.abstract_batch())


# ---- candidates ----------------------------------------------------------------------------


def _divisors(n: int, most: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (most is None or d <= most)]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout: mesh axis sizes within a slice and across slices, rules, remat, schedule."""

    ici: dict[str, int]
    dcn: dict[str, int]
    remat: str
    microbatches: int | None = None

    @property
    def name(self) -> str:
        axes = [f"{a}{n}" for a, n in self.ici.items() if n > 1]
        axes += [f"dcn_{a}{n}" for a, n in self.dcn.items() if n > 1]
        sched = f" m{self.microbatches}" if self.microbatches else ""
        return f"{'x'.join(axes) or 'one chip'} remat={self.remat}{sched}"

    def overrides(self) -> list[str]:
        out = [f"mesh.{a}={self.ici.get(a, 1)}" for a in sharding.MESH_AXES]
        out += [f"mesh.dcn_{a}={self.dcn.get(a, 1)}" for a in sharding.MESH_AXES]
        tensor, expert = self.ici.get("tensor", 1) > 1, self.ici.get("expert", 1) > 1
        rules = "fsdp" + "_tp" * tensor + "_ep" * expert
        out += [f"mesh.rules={rules}", f"model.remat={self.remat}"]
        if self.microbatches:
            out.append(f"model.pipeline_microbatches={self.microbatches}")
        return out


def candidates(
    config: RunConfig, chips: int, slices: int, remats: tuple[str, ...] = PLAN_REMATS
) -> list[Candidate]:
    """The layouts of `config` over `slices` slices of `chips` chips each: within a slice fsdp
    times tensor (dividing the heads, at most 8), expert (MoE, dividing the experts), stage
    (dividing the scanned layers) and context (sequences of 8192 tokens or more); across slices
    data, fsdp or stage. Only layouts whose batch splits evenly (and, with stages, into at least
    one microbatch per stage) are kept. Pipelines take 4, else 2, else 1 microbatch per stage."""
    model, batch, seq = config.model, config.data.batch_size, config.data.seq_len
    units = pipeline.units(model)
    across = [{}] if slices == 1 else [{"data": slices}, {"fsdp": slices}, {"stage": slices}]
    tensors = [t for t in _divisors(chips, 8) if model.num_heads % t == 0]
    experts = _divisors(chips) if model.moe.enabled else [1]
    experts = [e for e in experts if model.moe.num_experts % e == 0] if model.moe.enabled else [1]
    contexts = [c for c in _divisors(chips, 8) if seq % (2 * c) == 0] if seq >= 8192 else [1]
    out = []
    for dcn in across:
        for tensor in tensors:
            for expert in experts:
                for context in contexts:
                    for stage in _divisors(chips, 8) if model.scan_layers else [1]:
                        rest = chips // (tensor * expert * context * stage)
                        if rest * tensor * expert * context * stage != chips:
                            continue
                        ici = {
                            "stage": stage,
                            "fsdp": rest,
                            "expert": expert,
                            "context": context,
                            "tensor": tensor,
                        }
                        found = _schedule(ici, dcn, batch, units)
                        if found is False:
                            continue
                        out += [Candidate(ici, dcn, r, found) for r in remats]
    return out


def _schedule(
    ici: dict[str, int], dcn: dict[str, int], batch: int, units: int
) -> int | bool | None:
    """The pipeline microbatches of a layout (None without stages), or False if it cannot run."""
    size = {a: ici.get(a, 1) * dcn.get(a, 1) for a in sharding.MESH_AXES}
    if batch % math.prod(size[a] for a in sharding.BATCH_AXES):
        return False
    stages = size["stage"]
    if stages == 1:
        return None
    if units % stages:  # (what else a pipeline refuses, `pipeline.check` says in the row)
        return False
    inner = math.prod(size[a] for a in sharding.BATCH_AXES if a != "stage")
    for per_stage in (4, 2, 1):
        if batch % (per_stage * stages * inner) == 0:
            return per_stage * stages
    return False


# ---- the plan ------------------------------------------------------------------------------


def _state_bytes(plan: Any) -> int:
    """Bytes of the train state (parameters, optimizer) on the chip that holds the most."""
    import jax

    total = 0
    for leaf, shard in zip(
        jax.tree.leaves(plan.abstract_state), jax.tree.leaves(plan.state_shardings), strict=True
    ):
        total += math.prod(shard.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _row(candidate: Candidate, repeats: int) -> dict[str, Any]:
    stages = candidate.ici.get("stage", 1) * candidate.dcn.get("stage", 1)
    bubble = pipeline.bubble_fraction(stages, candidate.microbatches or 1, repeats)
    return {
        "layout": candidate.name,
        "overrides": candidate.overrides(),
        "bubble_fraction": round(bubble, 3),
    }


# Forward passes per training step's forward + backward (3 units: forward, and the backward's
# two): `full` remat runs the layers' forward again in the backward; the save_* policies keep
# the matmul outputs and recompute only the cheap elementwise work in between.
RECOMPUTE = {"none": 1.0, "full": 4 / 3}


def step_flops(config: RunConfig, chips: int, bubble: float) -> float:
    """FLOPs one chip runs in a train step of `config` over `chips` chips: the model's training
    FLOPs per token (`metrics.flops_per_token`) times the tokens, with the forward that remat
    recomputes, stretched by the pipeline's idle share `bubble` (the stages run on through it).
    The compiled program's own `cost_analysis` counts each loop's body once, so it is not used."""
    from jaxlm.metrics import flops_per_token

    tokens = config.data.batch_size * config.data.seq_len
    flops = flops_per_token(config.model, config.data.seq_len) * tokens / chips
    return flops * RECOMPUTE.get(config.model.remat, 1.0) / (1.0 - bubble)


def _figures(compiled: Any, chip: Chip, state: int, flops: float) -> dict[str, Any]:
    memory = compiled.memory_analysis()
    moved = collective_bytes(compiled.as_text())
    total = (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    seconds = (
        flops / chip.peak_flops
        + moved["ici"] / chip.ici_bytes_per_s
        + moved["dcn"] / DCN_BYTES_PER_S
    )
    return {
        "state_bytes": state,
        "argument_bytes": memory.argument_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "total_bytes": total,
        "fits": total <= chip.hbm_bytes,
        "flops": flops,
        "ici_bytes": moved["ici"],
        "dcn_bytes": moved["dcn"],
        "step_seconds": seconds,
    }


def _cache_key(run: RunConfig, topology: str, slices: int) -> str:
    import jax

    from jaxlm.configs.overrides import to_dict

    what = json.dumps([to_dict(run), topology, slices, jax.__version__, _VERSION], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:32]


_VERSION = 1  # of the figures a cached row holds


def plan_layouts(
    config: RunConfig,
    topology: str,
    slices: int = 1,
    remats: tuple[str, ...] = PLAN_REMATS,
    max_compiles: int | None = None,
    workers: int = 2,
    log: Any = None,
    cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Every candidate layout of `config` on `slices` x `topology`, compiled ahead of time
    (at most `max_compiles`, the ones with the least model parallelism first; per layout the
    `remats` in order until one fits), with its figures per chip, and the recommended one: of
    those that fit, the fastest estimate. Raises when the topology is unknown or no candidate
    fits (naming the bytes).

    `cache`: a directory where each compiled candidate's figures are kept (by its whole run
    config, the topology and the jax version), so a second plan compiles only what is new. XLA's
    own persistent cache is off meanwhile: an executable compiled for chips this machine does
    not have cannot be read back from it."""
    import jax

    from jaxlm.data.tokenizer import ByteTokenizer
    from jaxlm.run import RunPlan

    devices = topology_devices(topology, slices)
    chip = chip_of(devices[0])
    chips = len(devices) // slices
    found = candidates(config, chips, slices, remats)
    if not found:
        raise ValueError(
            f"no layout of {len(devices)} chips divides this run: batch {config.data.batch_size}, "
            f"{config.model.num_layers} layers, {config.model.num_heads} heads; try a batch that "
            f"is a multiple of {len(devices)}"
        )
    # Least model parallelism first (fsdp alone is usually fastest where it fits). Each layout
    # tries the remat policies in order, the least recomputation first, and stops at the first
    # that fits: the ones after it only recompute more (the estimate cannot prefer them).
    found.sort(
        key=lambda c: (
            c.ici.get("tensor", 1) * c.ici.get("stage", 1),
            c.dcn.get("stage", 1),  # stages over DCN next: they send activations, not weights
            c.ici.get("context", 1),
        )
    )
    layouts: dict[str, dict[str, Candidate]] = {}
    for c in found:
        layouts.setdefault(c.name.split(" remat=")[0], {})[c.remat] = c
    rows: list[dict[str, Any]] = []
    settled: dict[str, str] = {}  # layout -> why its later remat policies are not tried
    compiles = 0
    persistent = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for remat in remats:
            jobs = []
            for layout, by_remat in layouts.items():
                if layout in settled:
                    if settled[layout].startswith("skipped"):
                        rows.append(
                            {
                                **_row(by_remat[remat], config.model.pipeline_repeats),
                                "status": settled[layout],
                            }
                        )
                    continue
                row = _row(by_remat[remat], config.model.pipeline_repeats)
                rows.append(row)
                try:
                    run = apply_overrides(config, by_remat[remat].overrides())
                    plan = RunPlan(
                        run,
                        mesh=sharding.make_mesh(run.mesh, devices),
                        tokenizer=ByteTokenizer(),
                        check_data=False,
                    )
                except (ValueError, NotImplementedError) as e:  # the run's own checks
                    row["status"] = settled[layout] = f"refused: {str(e).splitlines()[0][:160]}"
                    continue
                state = _state_bytes(plan)
                row["state_bytes"] = state
                if state > chip.hbm_bytes:  # whatever the remat policy
                    row.update(status="state exceeds HBM", fits=False)
                    settled[layout] = row["status"]
                    continue
                key = None
                if cache is not None:
                    key = Path(cache) / f"{_cache_key(run, topology, slices)}.json"
                    if key.exists():
                        row.update(json.loads(key.read_text()), status="compiled (cached)")
                        if row["fits"]:
                            settled[layout] = f"skipped: remat={remat} fits"
                        continue
                if max_compiles is not None and compiles >= max_compiles:
                    row["status"] = "not compiled (--max-compiles)"
                    continue
                compiles += 1
                flops = step_flops(run, len(devices), row["bubble_fraction"])
                start = time.perf_counter()
                lowered = lower_train_step(plan)
                job = pool.submit(lowered.compile)
                jobs.append((layout, remat, row, state, flops, start, key, job))
            for layout, remat, row, state, flops, start, key, job in jobs:
                try:
                    compiled = job.result()
                except Exception as e:  # e.g. the compiler's own out-of-memory refusal
                    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                    row.update(status=f"compile failed: {reason}", fits=False)
                    # "... HLO temporaries (99.19G) exceeds available HBM (95.74G)": the bytes
                    if m := re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\)", reason):
                        temp = float(m.group(1)) * 1024.0 ** ("KMGT".index(m.group(2)) + 1)
                        row.update(temp_bytes=temp, total_bytes=state + temp)
                    continue
                figures = _figures(compiled, chip, state, flops)
                row.update(figures, status="compiled")
                row["compile_seconds"] = round(time.perf_counter() - start, 1)
                if figures["fits"]:
                    settled[layout] = f"skipped: remat={remat} fits"
                if key is not None:
                    key.parent.mkdir(parents=True, exist_ok=True)
                    tmp = key.with_suffix(".tmp")
                    tmp.write_text(json.dumps(figures))
                    tmp.replace(key)  # whole or absent, never half written
                if log is not None:
                    log(row)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        jax.config.update("jax_enable_compilation_cache", persistent)
    fitting = [r for r in rows if r.get("fits")]  # (none, if --max-compiles left them all out)
    result = {
        "topology": topology if slices == 1 else f"{slices} x {topology}",
        "chips": len(devices),
        "chip": dataclasses.asdict(chip),
        "seq_len": config.data.seq_len,
        "batch": config.data.batch_size,
        "layouts": rows,
        "recommended": min(fitting, key=lambda r: r["step_seconds"]) if fitting else None,
    }
    if not fitting and not any(r["status"].startswith("not compiled") for r in rows):
        sized = [r for r in rows if "total_bytes" in r or "state_bytes" in r]
        least = min(sized, key=lambda r: r.get("total_bytes", r.get("state_bytes")), default=None)
        if least is None:
            why = rows[0]["status"] if rows else "no candidates"
            raise ValueError(f"no layout could be compiled for {result['topology']}: {why}")
        need = least.get("total_bytes", least["state_bytes"])
        what = "state alone"
        if "total_bytes" in least:
            what = "state and temporaries"
            if least["status"].startswith("compiled"):
                what = "state, temporaries and outputs"
        raise ValueError(
            f"no layout fits {result['topology']}: {chip.name} has {chip.hbm_bytes / GIB:.1f} "
            f"GiB of HBM per chip; the smallest, {least['layout']}, needs "
            f"{need / GIB:.1f} GiB per chip ({what}); use more chips, a smaller batch or "
            "sequence, or a smaller model"
        )
    return result


def _short(overrides: list[str]) -> list[str]:
    """The overrides that differ from a size-1 axis (what a user passes with --set)."""
    return [o for o in overrides if not (o.startswith("mesh.") and o.endswith("=1"))]


def format_table(result: dict[str, Any], title: str) -> str:
    """`plan_layouts`' result as a table, with the recommended layout's --set flags."""
    chip = result["chip"]
    lines = [
        f"{title} on {result['topology']} ({result['chips']} chips, {chip['name']}, "
        f"{chip['hbm_bytes'] / GIB:.1f} GiB HBM each); seq_len {result['seq_len']}, "
        f"batch {result['batch']}",
        f"{'layout':<40} {'state':>7} {'temp':>7} {'total':>7} {'fits':>4} {'TFLOP':>7} "
        f"{'ICI GB':>7} {'DCN GB':>7} {'bubble':>6} {'est s':>8}  status",
    ]

    def gib(row: dict[str, Any], key: str) -> str:
        return f"{row[key] / GIB:7.2f}" if key in row else f"{'-':>7}"

    skipped = [r for r in result["layouts"] if r["status"].startswith("skipped")]
    for row in result["layouts"]:
        if row in skipped:
            continue
        compiled = "flops" in row
        fits = ("yes" if row["fits"] else "no") if "fits" in row else "-"
        numbers = (
            f"{row['flops'] / 1e12:7.1f} {row['ici_bytes'] / 1e9:7.2f} "
            f"{row['dcn_bytes'] / 1e9:7.2f} {row['bubble_fraction']:6.3f} "
            f"{row['step_seconds']:8.4f}"
            if compiled
            else f"{'-':>7} {'-':>7} {'-':>7} {row['bubble_fraction']:6.3f} {'-':>8}"
        )
        lines.append(
            f"{row['layout']:<40} {gib(row, 'state_bytes')} {gib(row, 'temp_bytes')} "
            f"{gib(row, 'total_bytes')} {fits:>4} {numbers}  {row['status']}"
        )
    best = result["recommended"]
    lines.append("(bytes per chip in GiB; TFLOP per chip per step; est s: roofline estimate)")
    if skipped:
        lines.append(f"({len(skipped)} slower remat policies of layouts that fit: not compiled)")
    lines.append(f"recommended: {best['layout']} ({best['total_bytes'] / GIB:.2f} GiB per chip)")
    lines.append("  " + " ".join(f"--set {o}" for o in _short(best["overrides"])))
    return "\n".join(lines)


# The pod each preset is meant for, with a sequence length and global batch to plan it at
# (`jaxlm plan --config NAME` with these; the tests check every preset has a layout there).
INTENDED_PODS: dict[str, tuple[str, int, int]] = {
    "tiny": ("v5e:2x2", 128, 16),
    "tiny-llama": ("v5e:2x2", 128, 16),
    "tiny-moe": ("v5e:2x2", 128, 16),
    "tiny-bert": ("v5e:2x2", 128, 16),
    "small": ("v5e:2x2", 256, 32),
    "gpt2-124m": ("v5e:2x4", 1024, 64),
    "gpt2-350m": ("v5e:2x4", 1024, 64),
    "bert-base": ("v5e:2x4", 512, 64),
    "llama3.2-1b": ("v5e:4x4", 4096, 32),
    "mixtral-small": ("v5e:4x4", 4096, 16),
    "fine-grained-moe": ("v5e:4x4", 4096, 32),
    "llama3-8b": ("v5p:4x4x4", 8192, 256),
    **{f"ladder-{i}": ("v5e:2x4", 2048, 64) for i in range(8)},
}
