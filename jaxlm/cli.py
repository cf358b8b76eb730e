"""The `jaxlm` command line (also `python -m jaxlm`)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxlm import compilation_cache, platforms
from jaxlm.configs.model import PLAN_REMATS
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.configs.quant import QuantConfig
from jaxlm.metrics import flops_per_token, param_count, training_state_bytes


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="preset name or a .py/.json config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.num_layers=4 (repeatable)",
    )


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process runs (not needed on Cloud TPU VMs, SLURM or Open MPI: detected)"
    )
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None, help="this process, 0-based")
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="SECONDS",
        help="fail the run this long after a process stops responding (default 100)",
    )
    group.add_argument(
        "--init-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="wait this long for every process to join (default 300)",
    )


def _join_processes(args: argparse.Namespace) -> None:
    """Initialise `jax.distributed` from the arguments, environment or cluster (before any device
    is touched)."""
    from jaxlm import distributed

    for name in ("heartbeat_timeout", "init_timeout"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, name)} must be >= 1 second")
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        init_timeout_s=args.init_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout,
    )


def _facts(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every process of a command must agree on: its arguments but its own process id."""
    return {"command": command, **vars(args), "func": None, "process_id": None}


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _per_device_bytes(config: Any, topology: str) -> dict[str, Any]:
    """Largest per-device share of params + Adam state under the run's mesh on a TPU topology."""
    import jax

    from jaxlm import sharding
    from jaxlm.model.transformer import abstract_params

    try:
        devices = platforms.tpu_topology(topology).devices
    except Exception as e:  # libtpu's errors vary by version; say what was asked for
        raise ValueError(
            f"cannot describe TPU topology {topology!r} (e.g. 'v5p:2x2x1', 'v5e:4x4'); "
            f"is jax[tpu] installed? ({e})"
        ) from None
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract = abstract_params(config.model)
    shardings = sharding.logical_to_sharding(abstract, mesh, sharding.get_rules(config.mesh.rules))
    from jaxlm.model.lora import is_adapter
    from jaxlm.tasks import param_names

    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: hasattr(x, "names"))
    names = param_names(abstract)
    per_device = [  # (elements, bytes) of each parameter's largest shard
        (n := math.prod(s.shard_shape(a.value.shape)), n * a.value.dtype.itemsize)
        for a, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
    ]
    adapters = sum(e for n, (e, _) in zip(names, per_device, strict=True) if is_adapter(n))
    # What trains: the adapters when there are some, else all (nothing for quantized weights).
    rest = 0 if config.model.quant.stored else sum(e for e, _ in per_device)
    params_bytes = sum(b for _, b in per_device)
    out = {
        "topology": topology,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "params_bytes_per_device": params_bytes,
        # Adam's two float32 moments of what trains.
        "params_and_adam_bytes_per_device": params_bytes + 8 * (adapters or rest),
    }
    if config.model.quant.stored:  # the same model's float weights, for comparison
        plain = dataclasses.replace(
            config, model=dataclasses.replace(config.model, quant=QuantConfig())
        )
        out["params_bytes_per_device_unquantized"] = _per_device_bytes(plain, topology)[
            "params_bytes_per_device"
        ]
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    from jaxlm import aot
    from jaxlm.configs.model import RematPolicy
    from jaxlm.data.sources import cache_dir

    config = load_config(args.config, args.overrides)
    overrides = []
    if args.seq_len is not None:
        if args.seq_len < 1:
            raise ValueError(f"--seq-len {args.seq_len} must be >= 1")
        overrides.append(f"data.seq_len={args.seq_len}")
        if args.seq_len > config.model.max_seq_len and config.model.position != "learned":
            overrides.append(f"model.max_seq_len={args.seq_len}")  # no weights depend on it
    if args.batch is not None:
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch} must be >= 1")
        overrides.append(f"data.batch_size={args.batch}")
    config = apply_overrides(config, overrides)
    remats = tuple(r for r in args.remat.split(",") if r)
    valid = typing.get_args(RematPolicy)
    if not remats or any(r not in valid for r in remats):
        raise ValueError(f"--remat {args.remat!r}: choose from {', '.join(valid)}")
    for flag, value in (("--max-compiles", args.max_compiles), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")

    def progress(row: dict[str, Any]) -> None:
        print(
            f"jaxlm plan: compiled {row['layout']} in {row['compile_seconds']} s",
            file=sys.stderr,
        )

    result = aot.plan_layouts(
        config,
        args.topology,
        args.slices,
        remats,
        max_compiles=args.max_compiles,
        workers=args.workers,
        log=progress,
        cache=None if args.no_cache else cache_dir() / "plan",
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(aot.format_table(result, f"jaxlm plan: {args.config or 'small'}"))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    model = config.model
    seq_len = model.max_seq_len if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= model.max_seq_len:
        raise ValueError(
            f"--seq-len {seq_len} must be in [1, model.max_seq_len={model.max_seq_len}]"
        )
    counts = param_count(model)
    state = training_state_bytes(model)
    if model.quant.stored:
        import jax

        from jaxlm.compress.quantize import stored_bytes
        from jaxlm.model.transformer import abstract_params

        shapes = jax.tree.leaves(abstract_params(model), is_leaf=lambda x: hasattr(x, "names"))
        state["params"] = stored_bytes([x.value for x in shapes])
        state["optimizer"] = counts.adapters * 8
    info: dict[str, Any] = {
        "params": counts.total,
        "params_non_embedding": counts.non_embedding,
        "params_active": counts.active,
        "params_adapters": counts.adapters,
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(model, seq_len),
        "params_bytes": state["params"],
        "params_and_adam_bytes": state["params"] + state["optimizer"],
    }
    from jaxlm.model import fused_attention

    on = "tpu" if args.topology else None
    impl, why = fused_attention.describe(model, seq_len, on=on)
    info["attention_impl"], info["attention_impl_reason"] = impl, why
    info["weights"] = model.quant.describe() if model.quant.bits else model.param_dtype
    from jaxlm import precision

    info["precision"] = precision.describe(config)
    if args.topology:
        info.update(_per_device_bytes(config, args.topology))
    stages = config.mesh.stage * config.mesh.dcn_stage
    if args.topology:
        stages = info["mesh"]["stage"]
    if stages > 1:  # (with -1 in the stage sizes, only a topology tells)
        from jaxlm.model import pipeline

        pipeline.check(model, {"stage": stages}, config.data.batch_size)
        m = pipeline.microbatches(model, stages)
        info["pipeline"] = {
            "stages": stages,
            "microbatches": m,
            "repeats": model.pipeline_repeats,
            "layers_per_stage": model.num_layers // stages,
            "bubble_fraction": pipeline.bubble_fraction(stages, m, model.pipeline_repeats),
        }
    from jaxlm.model import mup

    info["parametrization"] = model.parametrization
    if model.parametrization == "mup":
        info["mup"] = {
            "base_width": model.mup_base_width or model.d_model,
            "width_ratio": mup.width_ratio(model),
            "base_head_dim": mup.base_head_dim(model),
            "attention_scale": mup.attention_scale(model),
            "output_multiplier": mup.output_multiplier(model),
            "lr_multipliers": mup.lr_multipliers(model),
            "init_multipliers": {n: r.init for n, r in mup.rules(model).items() if r.init != 1.0},
        }
    if args.json:
        print(json.dumps(info))
        return 0
    gib = 2.0**30
    print(f"config:                     {args.config or 'small (the default job)'}")
    print(f"parameters:                 {counts.total:,} ({counts.non_embedding:,} non-embedding)")
    if counts.active != counts.total:
        print(f"active per token:           {counts.active:,} (MoE: top-k of the experts)")
    if counts.adapters:
        print(f"trained (adapters):         {counts.adapters:,} (LoRA / prompt tuning)")
    print(f"training FLOPs per token:   {info['flops_per_token']:.4g} (seq_len {seq_len})")
    dtype = model.quant.describe() if model.quant.bits else model.param_dtype
    print(f"params:                     {state['params'] / gib:.3f} GiB ({dtype})")
    print(f"params + Adam state:        {info['params_and_adam_bytes'] / gib:.3f} GiB")
    print(f"precision:                  {info['precision']}")
    if "pipeline" in info:
        p = info["pipeline"]
        trips = f", {p['repeats']} trips (circular)" * (p["repeats"] > 1)
        print(
            f"pipeline:                   {p['stages']} stages of {p['layers_per_stage']} layers, "
            f"{p['microbatches']} microbatches{trips}; bubble {p['bubble_fraction']:.1%}"
        )
    where = f" on {args.topology}" if args.topology else ""
    print(f"attention{where}:{' ' * max(1, 18 - len(where))}{impl} ({why})")
    for line in mup.describe(model):
        print(line)
    if args.topology:
        print(f"on {args.topology} ({info['devices']} chips, mesh {info['mesh']}):")
        per_device = info["params_and_adam_bytes_per_device"] / gib
        if model.quant.stored:
            params = info["params_bytes_per_device"] / gib
            plain = info["params_bytes_per_device_unquantized"] / gib
            print(f"  params per chip:          {params:.3f} GiB ({model.param_dtype} {plain:.3f})")
        print(f"  params + Adam per chip:   {per_device:.3f} GiB")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    name = Path(args.config).stem if args.config else "default"
    workdir = args.workdir or os.path.join("runs", name)
    from jaxlm import checkpoint, storage
    from jaxlm.configs.overrides import apply_overrides

    if args.config is None and (storage.as_path(workdir) / checkpoint.CONFIG_FILE).is_file():
        # Continue the run in `workdir` with its own config (plus any --set overrides).
        config = apply_overrides(checkpoint.load_run_config(workdir), args.overrides)
    elif args.config is None and args.init_from:
        # A new stage of another run: its config (model, tokenizer, data, ...) unless overridden.
        try:
            base = checkpoint.load_run_config(args.init_from)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--init-from {args.init_from!r} is not a jaxlm run directory (no "
                f"{checkpoint.CONFIG_FILE}); give a run's --workdir or an imported model"
            ) from None
        fresh = dataclasses.replace(base.train, init_from=None, init_from_step=None)
        config = apply_overrides(dataclasses.replace(base, train=fresh), args.overrides)
    else:
        config = load_config(args.config, args.overrides)
    if args.init_from:
        train_config = dataclasses.replace(config.train, init_from=args.init_from)
        config = dataclasses.replace(config, train=train_config)
    _join_processes(args)
    from jaxlm.loop import NonFiniteError, train

    try:
        train(config, workdir)
    except NonFiniteError as e:
        print(f"jaxlm train: stopped: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. no checkpoint in the workdir can be restored
        print(f"jaxlm train: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from jaxlm.scaling import sweep

    runs = sweep.load_sweep(args.file)
    workdir = args.workdir or os.path.join("runs", "sweeps", Path(args.file).stem)
    _join_processes(args)
    from jaxlm.loop import NonFiniteError

    main = _is_main_process()
    log = lambda m: print(m, file=sys.stderr, flush=True) if main else None
    try:
        rows = sweep.run_sweep(runs, workdir, overrides=args.overrides, log=log)
    except (NonFiniteError, RuntimeError) as e:
        print(f"jaxlm sweep: stopped: {e}", file=sys.stderr)
        return 1
    if main:
        print(
            f"jaxlm sweep: {len(rows)} of {len(runs)} runs finished; results in "
            f"{str(workdir).rstrip('/')}/{sweep.RESULTS_JSON} and {sweep.RESULTS_CSV}",
            file=sys.stderr,
        )
    return 0


N_COLUMNS = ("params", "params_non_embedding", "params_active")


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from jaxlm import scaling

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap} must be >= 0")
    rows = scaling.load_results(args.results)
    if args.params != "params":
        missing = [i for i, r in enumerate(rows) if args.params not in r]
        if missing:
            raise ValueError(f"rows {missing} of {args.results} have no {args.params!r} column")
        rows = [dict(r, params=r[args.params]) for r in rows]
    fits = scaling.fit_runs(rows, bootstrap=args.bootstrap, seed=args.seed)
    if fits.chinchilla is None and fits.isoflop is None and fits.power_law is None:
        reasons = "; ".join(f"{k}: {v}" for k, v in fits.skipped.items())
        raise ValueError(f"{args.results}: no fit is possible with {len(rows)} run(s) ({reasons})")
    print(json.dumps(fits.summary(args.target or None), indent=1))
    if args.plot:
        for path in scaling.plot_all(fits, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if bool(args.from_hf) == bool(args.to_hf):
        raise ValueError(
            "give one direction: --from-hf HF_DIR --to WORKDIR, or --to-hf WORKDIR --out DIR"
        )
    from jaxlm.interop import hf

    if args.from_hf:
        if not args.to:
            raise ValueError("--from-hf needs --to WORKDIR (the jaxlm run directory to create)")
        run_config = (
            load_config(args.config, args.overrides) if args.config or args.overrides else None
        )
        path = hf.import_checkpoint(
            args.from_hf,
            args.to,
            run_config=run_config,
            dtype=args.dtype,
            scan_layers=False if args.no_scan else None,
            tokenizer=args.tokenizer,
            adapter=args.adapter,
            quant=_quant_format(*QUANTIZE[args.quantize]) if args.quantize else None,
        )
        print(f"jaxlm convert: wrote the jaxlm run {path}", file=sys.stderr)
        print(f"sample with: jaxlm sample --workdir {path} --prompt ...", file=sys.stderr)
        return 0
    if not args.out:
        raise ValueError("--to-hf needs --out DIR (the Hugging Face directory to write)")
    if args.adapter:
        raise ValueError("--adapter goes with --from-hf (import); exports take --lora")
    if args.quantize:
        raise ValueError("--quantize goes with --from-hf (import); quantize a run: jaxlm quantize")
    if args.lora:
        from jaxlm.interop.peft import export_lora

        path = export_lora(
            args.to_hf,
            args.out,
            args.lora,
            step=args.step,
            model_type=args.model_type,
            dtype=args.dtype,
        )
        what = "a merged model" if args.lora == "merged" else "a PEFT adapter (base in base_model/)"
        print(f"jaxlm convert: wrote {path}: {what}")
        return 0
    path = hf.export_checkpoint(
        args.to_hf, args.out, step=args.step, model_type=args.model_type, dtype=args.dtype
    )
    exported = json.loads((path / "config.json").read_text())["architectures"][0]
    auto = "ForSequenceClassification" if "ForSequenceClassification" in exported else "ForCausalLM"
    print(f"jaxlm convert: wrote {path} (transformers.AutoModel{auto} loads it)")
    return 0


def _quant_format(bits: int | None, group: int | None, embed: bool = False) -> Any:
    """The `QuantConfig` of --bits/--group (int4 default: groups of 128), checked."""
    from jaxlm.configs.quant import QuantConfig

    if bits not in (4, 8):
        raise ValueError(f"--bits {bits} is not valid; choose 8 (int8) or 4 (packed int4)")
    if group is None and bits == 4:
        group = 128
    return QuantConfig(bits=bits, group=group, embed=embed)


def cmd_quantize(args: argparse.Namespace) -> int:
    from jaxlm.compress.quantize import quantize_workdir, stored_bytes

    fmt = _quant_format(args.bits, args.group, args.embed)
    path = quantize_workdir(args.workdir, args.out, fmt, step=args.step)
    from jaxlm.run import load_for_eval

    config, _, params, _ = load_for_eval(path)
    print(
        f"jaxlm quantize: wrote {path} ({config.model.quant.describe()}: "
        f"{stored_bytes(params) / 2**20:.2f} MiB of weights)",
        file=sys.stderr,
    )
    print(f"sample with: jaxlm sample --workdir {path} --prompt ...", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from jaxlm.compress.prune import prune_workdir

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    keep = None
    if args.keep:
        keep = {}
        for part in args.keep.split(","):
            name, _, value = part.partition("=")
            try:
                keep[name.strip()] = float(value)
            except ValueError:
                raise ValueError(
                    f"--keep {args.keep!r}: give KIND=FRACTION[,...], e.g. heads=0.5,mlp=0.75"
                ) from None
    path, _ = prune_workdir(
        args.workdir,
        args.out,
        target_params=args.target_params,
        keep=keep,
        kinds=kinds,
        score=args.score,
        calibration_batches=args.calibration_batches,
        step=args.step,
    )
    from jaxlm import checkpoint

    model = checkpoint.load_run_config(path).model
    print(
        f"jaxlm prune: wrote {path}: {param_count(model).total:,} parameters ({model.num_layers} "
        f"layers, {model.num_kv_heads} kv heads / {model.num_heads} heads, mlp_dim "
        f"{model.mlp_dim}); fine-tune with: jaxlm train --workdir {path} --set train.steps=N",
        file=sys.stderr,
    )
    return 0


def _task_args(args: argparse.Namespace) -> dict[str, Any]:
    """The harness options of `jaxlm eval`, checked before anything is loaded."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1 (documents per task)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {args.num_fewshot} must be >= 0")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise ValueError(f"--tasks {args.tasks!r} names no task (give NAME[,NAME] or FILE.yaml)")
    if (args.limit is not None or args.num_fewshot is not None) and not tasks:
        raise ValueError("--limit and --num-fewshot go with --tasks")
    if args.system_instruction is not None and not args.apply_chat_template:
        raise ValueError("--system-instruction goes with --apply-chat-template")
    if args.apply_chat_template and not tasks:
        raise ValueError("--apply-chat-template goes with --tasks")
    return dict(
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_paths=list(args.include_path or []),
        apply_chat_template=args.apply_chat_template,
        system_instruction=args.system_instruction,
    )


def _eval_tasks(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """`jaxlm eval --tasks`: harness tasks on the run; results JSON under <workdir>/evals/."""
    from jaxlm.evals.harness import JaxlmLM, headline, resolve_tasks, results_path, run_tasks

    resolve_tasks(options["tasks"], options["include_paths"])  # bad names before the load
    _join_processes(args)
    from jaxlm import distributed

    distributed.check_agreement(_facts("eval", args))
    lm = JaxlmLM.from_workdir(args.workdir, args.step, batch_size=args.batch_size)
    results = run_tasks(lm, options.pop("tasks"), **options)
    if _is_main_process():
        from jaxlm import storage

        path = args.output or results_path(args.workdir, lm.step, results)
        path = storage.as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        print(f"jaxlm eval: wrote {path}", file=sys.stderr)
        print(json.dumps({"step": lm.step, **headline(results)}))
    return 0


def _eval_card(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """`jaxlm eval --card`: a model card's figures as one JSON object."""
    from jaxlm.evals.card import model_card

    if options["tasks"]:
        from jaxlm.evals.harness import resolve_tasks

        resolve_tasks(options["tasks"], options["include_paths"])
    _join_processes(args)
    from jaxlm import distributed

    distributed.check_agreement(_facts("eval", args))
    card = model_card(args.workdir, args.step, eval_batches=args.batches, **options)
    if _is_main_process():
        print(json.dumps(card, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batches < 0:
        raise ValueError(f"--batches {args.batches} must be >= 0 (0 = the whole eval split)")
    options = _task_args(args)
    if args.card:
        return _eval_card(args, options)
    if options["tasks"]:
        return _eval_tasks(args, options)
    if args.output:
        raise ValueError("--output goes with --tasks (the harness results file)")
    _join_processes(args)
    from jaxlm import distributed
    from jaxlm.loop import eval_workdir

    distributed.check_agreement(_facts("eval", args))
    result = eval_workdir(args.workdir, args.batches, step=args.step)
    if _is_main_process():
        print(json.dumps({k: round(v, 6) for k, v in result.items()}))
    return 0


def _printable(text: str) -> str:
    # Bytes that are not valid UTF-8 (possible from a byte-level model) print as U+FFFD.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _fill_masks(args: argparse.Namespace) -> int:
    """`jaxlm sample --fill-mask TEXT`: one JSON line per text, the top-k fillers of each mask."""
    if args.prompt or args.prompt_file or args.chat:
        raise ValueError("give either --fill-mask (an encoder's masks) or --prompt/--chat")
    top_k = 5 if args.top_k is None else args.top_k
    if top_k < 1:
        raise ValueError(f"--top-k {top_k} must be >= 1 (the fillers shown per mask)")
    _join_processes(args)
    from jaxlm import distributed
    from jaxlm.encode import fill_mask, mask_token
    from jaxlm.run import load_for_eval
    from jaxlm.sharding import use_mesh

    distributed.check_agreement(_facts("sample", args))
    config, mesh, params, tokenizer = load_for_eval(args.workdir, args.step)
    with use_mesh(mesh, config.mesh.rules):
        answers = fill_mask(
            config.model,
            params,
            tokenizer,
            list(args.fill_mask),
            top_k,
            add_bos=config.data.add_bos,
            add_eos=config.data.add_eos,
        )
    if not _is_main_process():
        return 0
    print(f"jaxlm sample: {args.workdir} (mask: {mask_token(tokenizer)!r})", file=sys.stderr)
    for text, answer in zip(args.fill_mask, answers, strict=True):
        masks = [
            [{"token": _printable(f.text), "id": f.token_id, "prob": round(f.prob, 6)} for f in m]
            for m in answer.fillers
        ]
        print(json.dumps({"text": text, "filled": _printable(answer.filled), "masks": masks}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from jaxlm import sample

    if args.fill_mask:
        return _fill_masks(args)
    texts = list(args.prompt or [])
    for path in args.prompt_file or []:
        texts.append(Path(path).read_text())
    chats = list(args.chat or [])
    if texts and chats:
        raise ValueError("give either --prompt/--prompt-file (text to continue) or --chat")
    if args.system is not None and not chats:
        raise ValueError("--system goes with --chat")
    texts = texts or chats
    if not texts:
        raise ValueError("give a prompt: --prompt TEXT, --prompt-file FILE or --chat MESSAGE")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples} must be >= 1")
    if args.stream and len(texts) * args.num_samples != 1:
        raise ValueError("--stream prints one completion: use one prompt and --num-samples 1")
    chain = sample.strategies(args.temperature, args.top_k, args.top_p, args.min_p)
    for i, text in enumerate(texts):
        if not text:
            raise ValueError(f"prompt {i} is empty")

    _join_processes(args)
    from jaxlm import distributed
    from jaxlm.run import load_for_eval
    from jaxlm.sharding import use_mesh

    distributed.check_agreement(_facts("sample", args))
    config, mesh, params, tokenizer = load_for_eval(args.workdir, args.step)
    if args.kv_cache:
        model = dataclasses.replace(config.model, kv_cache_dtype=args.kv_cache)
        config = dataclasses.replace(config, model=model)
    main = _is_main_process()  # every process generates (the parameters span them); one prints
    out = sys.stdout if main else io.StringIO()
    if chats:
        # The run's chat template renders the turn; the reply stops at the end of the turn.
        from jaxlm.data.chat import get_template, stop_ids
        from jaxlm.tasks.sft import chat_prompt

        template = get_template(config.task.chat_template, tokenizer)
        system = [{"role": "system", "content": args.system}] if args.system else []
        rendered = [
            chat_prompt([*system, {"role": "user", "content": t}], tokenizer, template)
            for t in texts
        ]
        prompts = [p for p in rendered for _ in range(args.num_samples)]
        stop = stop_ids(template, tokenizer)
        texts = [""] * len(texts)  # print only the reply
    else:
        bos = [tokenizer.bos_id] if config.data.add_bos else []
        prompts = [bos + tokenizer.encode(t) for t in texts for _ in range(args.num_samples)]
        stop = [tokenizer.eos_id] if config.data.add_eos else []
    kwargs = dict(key=args.seed, chain=chain, stop_tokens=stop, pad_id=tokenizer.pad_id)
    if main:
        print(
            f"jaxlm sample: {args.workdir} ({len(prompts)} completion(s), up to "
            f"{args.max_new_tokens} new tokens, {chain})",
            file=sys.stderr,
        )
    with use_mesh(mesh, config.mesh.rules):
        if args.stream:
            out.write(texts[0])
            ids: list[int] = []
            shown = ""
            for chunk in sample.generate_stream(
                config.model, params, prompts, args.max_new_tokens, **kwargs
            ):
                ids += chunk[0]
                text = _printable(tokenizer.decode(ids)).rstrip("\ufffd")  # wait for whole chars
                out.write(text[len(shown) :])
                out.flush()
                shown = text
            out.write(_printable(tokenizer.decode(ids))[len(shown) :] + "\n")
            return 0
        outs = sample.generate(config.model, params, prompts, args.max_new_tokens, **kwargs)
    for j, ids in enumerate(outs):
        if len(outs) > 1:
            prompt, sample_no = j // args.num_samples + 1, j % args.num_samples + 1
            print(f"=== prompt {prompt}, sample {sample_no} ===", file=out)
        print(texts[j // args.num_samples] + _printable(tokenizer.decode(ids)), file=out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in [0, 65535] (0 = any free port)")
    if not 1 <= args.slots <= 4096:
        raise ValueError(f"--slots {args.slots} must be in [1, 4096]")
    import signal
    import threading

    import jax

    from jaxlm.data.chat import get_template, stop_ids
    from jaxlm.run import load_for_eval
    from jaxlm.serve.engine import Engine
    from jaxlm.serve.http import Server

    if jax.process_count() > 1:
        raise ValueError("jaxlm serve runs on one host; serve a model that fits one host's devices")
    config, mesh, params, tokenizer = load_for_eval(args.workdir, args.step)
    if args.kv_cache:
        model = dataclasses.replace(config.model, kv_cache_dtype=args.kv_cache)
        config = dataclasses.replace(config, model=model)
    engine = Engine(
        config.model, params, args.slots, mesh=mesh, rules=config.mesh.rules,
        pad_id=tokenizer.pad_id,
    )  # fmt: skip
    template = get_template(config.task.chat_template, tokenizer)
    from jaxlm import storage

    name = args.name or storage.as_path(args.workdir, absolute=True).name
    try:
        server = Server(
            engine,
            tokenizer,
            name,
            template=template,
            stop_ids=[tokenizer.eos_id] if config.data.add_eos else [],
            chat_stop_ids=stop_ids(template, tokenizer),
            bos_id=tokenizer.bos_id if config.data.add_bos else None,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            log=not args.quiet,
        )
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); choose "
                         "another --host/--port") from None  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine.start()  # compiles the decode step
    server.start()
    print(
        f"jaxlm serve: model {name!r} at {server.url} ({args.slots} slots, context "
        f"{engine.context} tokens, chat template {template.name or 'tokenizer'!r}); SIGTERM or "
        "Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    print("jaxlm serve: stopping: finishing the requests accepted", file=sys.stderr, flush=True)
    server.shutdown()
    print("jaxlm serve: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from jaxlm.data.chat import conversation
    from jaxlm.data.preference import pair_conversations
    from jaxlm.files import read_jsonl

    # Every record is checked before the model is loaded.
    chats, rows = [], []
    for n, record in read_jsonl(args.input):
        where = f"{args.input}:{n}"
        if "chosen" in record or "rejected" in record:
            prompt, chosen, rejected = pair_conversations(record, where)
            rows.append((len(chats), 2))
            chats += [[*prompt, {"role": "assistant", "content": r}] for r in (chosen, rejected)]
        else:
            rows.append((len(chats), 1))
            chats.append(conversation(record, where))
    if not chats:
        raise ValueError(f"{args.input} holds no record")
    _join_processes(args)
    from jaxlm import distributed
    from jaxlm.run import load_for_eval
    from jaxlm.sharding import use_mesh
    from jaxlm.tasks.reward import score_chats

    distributed.check_agreement(_facts("score", args))
    config, mesh, params, tokenizer = load_for_eval(args.workdir, args.step)
    with use_mesh(mesh, config.mesh.rules):
        rewards = score_chats(config, params, tokenizer, chats, args.batch_size)
    if not _is_main_process():
        return 0
    correct = pairs = 0
    for at, size in rows:
        if size == 2:
            chosen, rejected = rewards[at], rewards[at + 1]
            pairs += 1
            correct += chosen > rejected
            print(json.dumps({"chosen": chosen, "rejected": rejected, "margin": chosen - rejected}))
        else:
            print(json.dumps({"reward": rewards[at]}))
    summary = f"jaxlm score: {len(rows)} record(s)"
    if pairs:
        summary += f"; pairwise accuracy {correct / pairs:.4f} over {pairs} pair(s)"
    print(summary, file=sys.stderr)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxlm.data import HFTokenizer, SentencePieceTokenizer, stdlib_files

    inputs = [str(f) for f in stdlib_files()] if args.input == ["stdlib"] else args.input
    if args.kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer.train(inputs, args.vocab_size)
    else:
        tokenizer = HFTokenizer.train_bpe(inputs, args.vocab_size)
    tokenizer.save(args.out)
    fewer = (
        f"; fewer than the {args.vocab_size} asked: the input has no more to merge"
        if tokenizer.vocab_size < args.vocab_size
        else ""
    )
    print(f"wrote a {args.kind} tokenizer ({tokenizer.vocab_size} ids) to {args.out}{fewer}")
    print(
        f"use it with: --set data.tokenizer={args.out} --set model.vocab_size="
        f"{tokenizer.vocab_size} (or more)"
    )
    return 0


QUANTIZE = {"int8": (8, None), "int4": (4, 128)}  # convert --quantize: (bits, group)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameters, FLOPs per token and memory of a config")
    _add_config_args(info)
    info.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    info.add_argument(
        "--topology", default=None, help="TPU topology, e.g. v5p:4x4x4 (needs jax[tpu])"
    )
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    pln = sub.add_parser(
        "plan",
        help="which mesh and remat policy fit a TPU topology: each candidate's train step "
        "compiled ahead of time (needs jax[tpu], no TPU)",
    )
    _add_config_args(pln)
    pln.add_argument("--topology", required=True, help="one slice's topology, e.g. v5p:4x4x4")
    pln.add_argument("--slices", type=int, default=1, help="slices joined by DCN (default 1)")
    pln.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    pln.add_argument("--batch", type=int, default=None, help="global batch (data.batch_size)")
    pln.add_argument(
        "--remat",
        default=",".join(PLAN_REMATS),
        help=f"remat policies to try, comma-separated (default {','.join(PLAN_REMATS)})",
    )
    pln.add_argument(
        "--max-compiles", type=int, default=None, help="compile at most this many candidates"
    )
    pln.add_argument("--workers", type=int, default=2, help="compiles in parallel (default 2)")
    pln.add_argument("--json", action="store_true", help="print one JSON object")
    pln.add_argument(
        "--no-cache",
        action="store_true",
        help="compile every candidate again (default: reuse the figures of earlier plans, kept "
        "in <jaxlm cache>/plan)",
    )
    pln.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="train a model (resumes from the workdir's checkpoints)")
    _add_config_args(train)
    train.add_argument("--workdir", default=None, help="default: runs/<config name>")
    train.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start a new run from this run's (or imported model's) parameters, with a fresh "
        "optimizer; without --config its config is the starting point",
    )
    _add_distributed_args(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained run")
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument("--batches", type=int, default=0, help="0 = the whole eval split")
    evaluate.add_argument(
        "--step", type=int, default=None, help="default: the newest checkpoint that restores"
    )
    evaluate.add_argument(
        "--tasks",
        default=None,
        help="lm-evaluation-harness tasks, NAME[,NAME] or local FILE.yaml (needs jaxlm[eval])",
    )
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="default: the task's")
    evaluate.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    evaluate.add_argument(
        "--include-path",
        action="append",
        help="a directory of local task YAML files (repeatable)",
    )
    evaluate.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="prompts as chat turns in the run's task.chat_template (few-shot as earlier turns)",
    )
    evaluate.add_argument("--system-instruction", default=None, help="a system turn first")
    evaluate.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    evaluate.add_argument(
        "--output", default=None, help="results JSON (default: <workdir>/evals/...json)"
    )
    evaluate.add_argument(
        "--card",
        action="store_true",
        help="print a model card's figures (params, training tokens/FLOPs, held-out loss, "
        "task results with --tasks, decode speed) as one JSON",
    )
    _add_distributed_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    smp = sub.add_parser("sample", help="generate text from a trained run's newest checkpoint")
    smp.add_argument("--workdir", required=True)
    smp.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    smp.add_argument("--prompt-file", action="append", help="a file whose text is one prompt")
    smp.add_argument(
        "--chat",
        action="append",
        metavar="MESSAGE",
        help="a user message: the reply is generated with the run's chat template, up to the "
        "end of the turn (repeatable: one chat each)",
    )
    smp.add_argument("--system", default=None, help="a system message for --chat")
    smp.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    smp.add_argument("--max-new-tokens", type=int, default=128)
    smp.add_argument(
        "--kv-cache",
        default=None,
        choices=["auto", "int8"],
        help="the KV cache's dtype (default: the run's model.kv_cache_dtype; auto = compute)",
    )
    smp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    smp.add_argument(
        "--fill-mask",
        action="append",
        metavar="TEXT",
        help="an encoder's (masked LM's) text with [MASK]s: prints the top-k fillers of each "
        "mask as one JSON line (repeatable)",
    )
    smp.add_argument("--top-k", type=int, default=None, help="with --fill-mask: fillers (5)")
    smp.add_argument("--top-p", type=float, default=None)
    smp.add_argument("--min-p", type=float, default=None)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    smp.add_argument(
        "--step", type=int, default=None, help="default: the newest checkpoint that restores"
    )
    _add_distributed_args(smp)
    smp.set_defaults(func=cmd_sample)

    srv = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching) for a run"
    )
    srv.add_argument("--workdir", required=True)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0 = any free port")
    srv.add_argument("--slots", type=int, default=16, help="requests decoded together")
    srv.add_argument("--name", default=None, help="the model id clients ask for (default: the "
                     "workdir's directory name)")  # fmt: skip
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    srv.add_argument("--kv-cache", default=None, choices=["auto", "int8"])
    srv.add_argument(
        "--step", type=int, default=None, help="default: the newest checkpoint that restores"
    )
    srv.add_argument("--quiet", action="store_true", help="do not log each HTTP request")
    srv.set_defaults(func=cmd_serve)

    conv = sub.add_parser("convert", help="Hugging Face safetensors <-> jaxlm checkpoints")
    conv.add_argument("--from-hf", default=None, metavar="HF_DIR", help="import this model dir")
    conv.add_argument("--to", default=None, metavar="WORKDIR", help="the jaxlm run to create")
    conv.add_argument("--to-hf", default=None, metavar="WORKDIR", help="export this jaxlm run")
    conv.add_argument("--out", default=None, metavar="DIR", help="the HF directory to write")
    conv.add_argument("--step", type=int, default=None, help="checkpoint to export (newest)")
    conv.add_argument("--model-type", default=None, help="HF model_type to export as")
    conv.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights"
    )
    conv.add_argument("--no-scan", action="store_true", help="import with unrolled layers")
    conv.add_argument("--tokenizer", default=None, help="tokenizer spec to use instead")
    conv.add_argument(
        "--lora",
        default=None,
        choices=["merged", "adapter"],
        help="export a LoRA run as one merged model, or as a PEFT adapter plus its base",
    )
    conv.add_argument(
        "--adapter", default=None, metavar="DIR", help="import a PEFT LoRA adapter onto the model"
    )
    conv.add_argument(
        "--quantize",
        default=None,
        choices=sorted(QUANTIZE),
        help="store the imported weights quantized (int4: groups of 128)",
    )
    _add_config_args(conv)
    conv.set_defaults(func=cmd_convert)

    qnt = sub.add_parser("quantize", help="a run's weights as int8 or int4, into a new run")
    qnt.add_argument("--workdir", required=True, help="the float run to quantize")
    qnt.add_argument("--out", required=True, help="the quantized run to create")
    qnt.add_argument("--bits", type=int, required=True, help="8 (int8) or 4 (packed int4)")
    qnt.add_argument(
        "--group",
        type=int,
        default=None,
        help="inputs per scale (default: 128 for int4, per output channel for int8)",
    )
    qnt.add_argument(
        "--embed", action="store_true", help="also the embedding table and untied output head"
    )
    qnt.add_argument("--step", type=int, default=None, help="default: the newest that restores")
    qnt.set_defaults(func=cmd_quantize)

    prn = sub.add_parser("prune", help="remove heads, MLP neurons or layers, into a new run")
    prn.add_argument("--workdir", required=True, help="the run to prune")
    prn.add_argument("--out", required=True, help="the smaller run to create")
    prn.add_argument("--target-params", type=int, default=None, help="at most this many")
    prn.add_argument(
        "--keep", default=None, help="fractions kept instead, e.g. heads=0.5,mlp=0.75,layers=1"
    )
    prn.add_argument(
        "--kinds", default="heads,mlp", help="what --target-params shrinks (heads,mlp,layers)"
    )
    prn.add_argument("--score", default="taylor", choices=["taylor", "magnitude"])
    prn.add_argument(
        "--calibration-batches",
        type=int,
        default=8,
        help="for the Taylor score and the choice of sizes",
    )
    prn.add_argument("--step", type=int, default=None, help="default: the newest that restores")
    prn.set_defaults(func=cmd_prune)

    swp = sub.add_parser("sweep", help="run a sweep file's training runs, collect results")
    swp.add_argument("file", help="a .py file defining SWEEP or get_sweep() (SweepRun list)")
    swp.add_argument("--workdir", default=None, help="default: runs/sweeps/<file name>")
    swp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field of every run (repeatable)",
    )
    _add_distributed_args(swp)
    swp.set_defaults(func=cmd_sweep)

    scl = sub.add_parser("scaling", help="scaling-law fits of a sweep's results")
    scl_sub = scl.add_subparsers(dest="scaling_command", required=True)
    fit = scl_sub.add_parser("fit", help="approach 3, approach 2 and L(C) fits; JSON to stdout")
    fit.add_argument("results", help="results.json / results.csv, or a sweep directory")
    fit.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--params", choices=N_COLUMNS, default="params", help="the column used as N")
    fit.add_argument(
        "--target",
        type=float,
        action="append",
        default=[],
        metavar="FLOPS",
        help="compute budget for a compute-optimal recommendation (repeatable)",
    )
    fit.set_defaults(func=cmd_scaling_fit)

    scr = sub.add_parser("score", help="rewards of conversations or preference pairs (JSONL)")
    scr.add_argument("--workdir", required=True, help="a reward model's run (model.head=score)")
    scr.add_argument(
        "--input",
        required=True,
        help="JSONL: conversations ('messages' or 'prompt' + 'completion') or pairs ('prompt', "
        "'chosen', 'rejected'); one JSON line out per record",
    )
    scr.add_argument(
        "--step", type=int, default=None, help="default: the newest checkpoint that restores"
    )
    scr.add_argument("--batch-size", type=int, default=16, help="conversations per forward pass")
    _add_distributed_args(scr)
    scr.set_defaults(func=cmd_score)

    tokenizer = sub.add_parser("tokenizer", help="train tokenizers")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser(
        "train", help="train a SentencePiece or byte-level BPE tokenizer"
    )
    tok_train.add_argument("--kind", choices=["sentencepiece", "bpe"], required=True)
    tok_train.add_argument("--vocab-size", type=int, required=True)
    tok_train.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text files or globs; 'stdlib' for the default corpus",
    )
    tok_train.add_argument("--out", required=True, help="directory to write the tokenizer to")
    tok_train.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    platforms.skip_absent_accelerators()  # no libtpu start-up errors where no TPU is attached
    compilation_cache.enable()  # before anything compiles
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as e:
        # A path given that cannot be used as asked: bad input, named.
        reason = {
            IsADirectoryError: "is a directory, not a file",
            NotADirectoryError: "is not a directory",
            FileExistsError: "exists and is not a directory",
            PermissionError: "cannot be written or read (permission denied)",
        }[type(e)]
        print(f"jaxlm {args.command}: error: {e.filename!r} {reason}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up mid-run: the last complete checkpoint is kept
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from jaxlm.checkpoint import CheckpointError

        if not isinstance(e, CheckpointError):
            raise  # a bug or an XLA failure: the traceback is what a report needs
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\njaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
