"""The training loop: the one imperative module (mesh, data, state, steps, eval, logs, saves)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm import checkpoint, compilation_cache, distributed, metrics, storage
from jaxlm.configs.overrides import to_dict
from jaxlm.configs.run import RunConfig
from jaxlm.data import as_stream_state, to_global
from jaxlm.run import RunPlan, check_init_source, load_for_eval, state_from_source
from jaxlm.sample import generate, strategies
from jaxlm.sharding import use_mesh


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def evaluate(plan: RunPlan, params: Any, max_batches: int = 0) -> dict[str, float]:
    """The task's eval metrics (LM: loss, perplexity, bits per byte) over the eval split (or its
    first `max_batches` batches)."""
    it = plan.make_iterator(split=plan.config.data.eval_split, num_epochs=1)
    sums: dict[str, float] = {}
    i = 0
    while not max_batches or i < max_batches:
        batch = next(it, None)
        # Processes may run out of rows at different batches: all go on while any has some.
        if not any(distributed.allgather_json(batch is not None)):
            break
        batch = it.empty_batch() if batch is None else batch
        batch = to_global(batch, plan.mesh, it.rows, it.global_batch)
        if plan.rollouts is not None:  # online RL: greedy replies to the prompts, scored
            batch = plan.rollouts.eval_batch(params, batch)
        out = plan.eval_step(params, batch)
        i += 1
        for k, v in jax.device_get(out).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    compilation_cache.return_free_heap()  # what compiling the eval step (and its data) freed
    return plan.task.eval_metrics(sums)


class _Progress:
    """A one-line progress display on a terminal; plain lines every `log_every` steps otherwise."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._tty = sys.stderr.isatty() and jax.process_index() == 0
        self.live = self._tty  # updated every step (else only logged steps are shown)

    def update(self, step: int, values: dict[str, float], log_line: bool) -> None:
        text = f"step {step}/{self._total}  loss {values['loss']:.4f}"
        if "tokens_per_sec" in values:
            text += f"  {values['tokens_per_sec']:,.0f} tok/s  mfu {values['mfu']:.2%}"
        if "first_step_sec" in values:
            text += f"  (first step, compile included: {values['first_step_sec']:.1f} s)"
        if self._tty:
            print("\r" + text, end="\n" if step == self._total else "", file=sys.stderr, flush=True)
        elif log_line:
            _log(text)


_clock = time.perf_counter  # the loop's wall clock (tests replace it)


class _Throughput:
    """Tokens/s and MFU over the steps an interval covers, measured between points where every
    dispatched step has finished and none is in flight (so no step's time is counted twice or
    for another interval); compilation, evaluation and checkpoint writes are left out."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float) -> None:
        self._tokens, self._flops, self._peak = tokens_per_step, flops_per_step, peak
        self._time, self._step = _clock(), 0

    def restart(self, step: int) -> None:
        """Every step up to `step` is done and nothing else runs: the next interval starts."""
        self._time, self._step = _clock(), step

    def rates(self, step: int) -> dict[str, float]:
        """Rates over the steps since the last restart (an estimate when a step is in flight,
        never above the true rate: time spent on the in-flight step only lowers it)."""
        steps, elapsed = step - self._step, _clock() - self._time
        if steps <= 0 or elapsed <= 0:
            return {}
        flops = steps * self._flops / elapsed
        return {
            "tokens_per_sec": steps * self._tokens / elapsed,
            "model_flops_per_sec": flops,
            "mfu": flops / self._peak,
        }


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss, gradient or update."""


class _StopRequests:
    """SIGTERM/SIGINT handling: the first signal asks the loop to save and stop after the current
    step; a second one exits at once (Orbax's atomic commit keeps the last complete checkpoint)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._agreement = distributed.StopAgreement()

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            _log(f"{name} again: exiting now without saving; the last complete checkpoint is kept")
            os._exit(128 + signum)
        self.signal = signum
        _log(f"{name}: finishing this step, then saving a checkpoint and exiting (again = abort)")

    def requested(self, step: int) -> bool:
        # Every process must stop at the same step (a signal may reach only some of them).
        return self._agreement.should_stop(step, self.signal is not None)


def _run_facts(config: RunConfig, workdir: storage.AnyPath) -> dict[str, Any]:
    """What every process of one run must share (compared before anything else happens)."""
    return {
        "config": distributed.fingerprint(to_dict(config)),
        "workdir": str(storage.as_path(workdir, absolute=True)),
        "jaxlm": _version(),
        "local_devices": jax.local_device_count(),
        "platform": jax.devices()[0].platform,
    }


def _version() -> str:
    try:
        return importlib.metadata.version("jaxlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_resume(config: RunConfig, workdir: storage.AnyPath) -> None:
    steps = checkpoint.complete_steps(workdir)
    if not steps:
        return
    saved = checkpoint.load_run_config(workdir)
    conflicts = checkpoint.resume_conflicts(saved, config)
    if conflicts:
        details = "; ".join(
            f"{k}: saved {a!r}, now {b!r}"
            for k, a, b in ((k, *v) for k, v in sorted(conflicts.items()))
        )
        raise ValueError(
            f"{workdir} holds a run that cannot resume with this config ({details}); "
            "use another --workdir, or the saved values"
        )
    before = saved.optim.schedule_steps or saved.train.steps
    after = config.optim.schedule_steps or config.train.steps
    if before != after:
        _log(
            f"note: the learning-rate schedule now spans {after} steps (it spanned {before}), so "
            f"the learning rate changes from the resumed step on; --set optim.schedule_steps="
            f"{before} keeps the old schedule"
        )


def _branch_source(
    config: RunConfig, workdir: str | Path, step: int | None
) -> tuple[storage.AnyPath, int]:
    """(run directory, step) that `train.branch_from` names, checked: a complete checkpoint
    before `train.steps`, of a run this config could resume."""
    workdir = storage.as_path(workdir)
    flag = f"train.branch_from={str(workdir)!r}"
    steps = checkpoint.complete_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{flag}: no complete checkpoint there (is it a jaxlm run?)")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(
            f"train.branch_from_step={step}: no such checkpoint in {workdir}; steps: {steps}"
        )
    if step >= config.train.steps:
        raise ValueError(
            f"{flag} at step {step}: train.steps={config.train.steps} leaves nothing to train; "
            f"set train.steps > {step}"
        )
    conflicts = checkpoint.resume_conflicts(checkpoint.saved_config(workdir, step), config)
    if conflicts:
        details = "; ".join(
            f"{k}: {a!r} there, {b!r} here" for k, (a, b) in sorted(conflicts.items())
        )
        raise ValueError(f"{flag} cannot be continued with this config ({details})")
    return workdir, step


def train(
    config: RunConfig,
    workdir: str | Path,
    *,
    init_from: str | Path | None = None,
    init_from_step: int | None = None,
) -> dict[str, Any]:
    """Train (resuming from the newest complete checkpoint in `workdir`), evaluate, save, sample.

    `init_from` (or `config.train.init_from`): a new run starts from the parameters of that run's
    checkpoint at `init_from_step` (default: its newest), with a fresh optimizer and schedule;
    once `workdir` holds a checkpoint the run resumes from it instead.

    Returns {"history": logged train metrics, "sample": text, "state": final TrainState,
    "step": last step, "stopped_by": signal name or None}. SIGTERM/SIGINT save and return early;
    `NonFiniteError` is raised after `train.max_nonfinite_steps` consecutive skipped steps.
    """
    if init_from is not None or init_from_step is not None:
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(
                config.train,
                init_from=config.train.init_from if init_from is None else str(init_from),
                init_from_step=init_from_step,
            ),
        )
    workdir = storage.as_path(workdir)
    if config.train.init_from_step is not None and config.train.init_from is None:
        raise ValueError(
            f"train.init_from_step={config.train.init_from_step} needs train.init_from "
            "(--init-from DIR): the step of which run?"
        )
    if config.train.branch_from_step is not None and config.train.branch_from is None:
        raise ValueError(
            f"train.branch_from_step={config.train.branch_from_step} needs train.branch_from "
            "(a run directory): the step of which run?"
        )
    quant = config.model.quant
    if quant.stored and not config.model.lora.rank:
        raise ValueError(
            f"this model's weights are stored quantized (model.quant: {quant.describe()}) and "
            "cannot train; fine-tune the float run with model.quant.qat=true (quantization-aware "
            "training, then jaxlm quantize), or train LoRA adapters on it (model.lora.rank=N)"
        )
    distributed.check_agreement(_run_facts(config, workdir))
    plan = RunPlan(config)  # the checks, mesh, task, optimizer and abstract state
    mesh, tokenizer = plan.mesh, plan.tokenizer
    downstream = _downstream_tasks(config)
    _check_resume(config, workdir)
    span = config.optim.schedule_steps or config.train.steps
    if config.optim.warmup_steps >= span:
        _log(
            f"note: optim.warmup_steps={config.optim.warmup_steps} spans the whole {span}-step "
            f"schedule: the learning rate never reaches optim.learning_rate="
            f"{config.optim.learning_rate:g} (--set optim.warmup_steps=N for fewer)"
        )
    source = branch = None
    if config.train.init_from is not None and not checkpoint.complete_steps(workdir):
        source = check_init_source(plan, config.train.init_from, config.train.init_from_step)
    if config.train.branch_from is not None and not checkpoint.complete_steps(workdir):
        branch = _branch_source(config, config.train.branch_from, config.train.branch_from_step)
    # The data next (a corpus that cannot be read fails here), and only then the workdir is made.
    train_it = plan.make_iterator()
    # Weights a task reads besides the run's (a reward model, a frozen reference): checked and
    # loaded before anything is written.
    rollouts = plan.rollouts
    plan.frozen_inputs  # noqa: B018 (e.g. a distillation teacher, loaded now)
    # Room for the checkpoints still to be written: `keep` + the one being written, less those
    # already on disk (they are replaced, not added to).
    existing = len(checkpoint.complete_steps(workdir))
    to_write = max(config.checkpoint.keep + 1 - existing, 1)
    if jax.process_index() == 0:
        checkpoint.check_workdir(workdir, to_write * plan.checkpoint_bytes())
        if storage.is_remote(workdir):
            _log(f"note: workdir {workdir} is a bucket; its free space is not checked")
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    if jax.process_index() == 0:
        checkpoint.save_run_files(workdir, config, tokenizer)
    tokenizer_files = checkpoint.tokenizer_files(tokenizer)

    resumed = ckpt.restore_latest(lambda step: ckpt.restore(step, plan.abstract_state), _log)
    if not resumed and branch is not None:
        source_ckpt = checkpoint.Checkpointer(branch[0], read_only=True)
        try:
            resumed = branch[1], source_ckpt.restore(branch[1], plan.abstract_state)
        finally:
            source_ckpt.close()
    if resumed:
        start, (state, data_state) = resumed
        data_state = as_stream_state(data_state)
        if data_state["num_streams"] != train_it.num_streams and not config.data.streams:
            # Resumed on another process count: keep the saved streams, so the data continues
            # exactly where it stopped.
            train_it = plan.make_iterator(num_streams=data_state["num_streams"])
        train_it.set_state(data_state)
        if branch is not None and not checkpoint.complete_steps(workdir):
            _log(f"branched from step {start} of {branch[0]}")
        else:
            _log(f"resumed from step {start} in {ckpt.directory}")
        if int(state.step) != start:
            raise RuntimeError(f"checkpoint {start} holds state.step={int(state.step)}")
    elif source is not None:
        start, state = 0, state_from_source(plan, source)
        _log(f"starting from the parameters of {source.workdir} (step {source.step})")
    else:
        start, state = 0, plan.init_state()
    train_step = plan.train_step

    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = metrics.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
    peak, peak_source = metrics.peak_flops_per_device(config.train.peak_flops_per_device)
    peak_total = peak * jax.device_count()
    _log(
        f"jaxlm train: {metrics.param_count(config.model).total:,} params on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; "
        f"peak {peak_total:.3g} FLOP/s ({peak_source}); workdir {workdir}"
    )

    if jax.process_index() == 0:
        # Records past the resumed step came from a run that was cut off: they are redone.
        metrics.drop_records_after(workdir / metrics.METRICS_FILE, start)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    progress = _Progress(config.train.steps)
    total = config.train.steps
    pending = None  # (step, device metrics): fetched after the next step is dispatched
    meter = _Throughput(tokens_per_step, flops_per_step, peak_total)
    history: list[dict[str, float]] = []

    def finish(step: int, device_metrics: Any, settled: bool) -> None:
        """Fetch step `step`'s metrics; `settled`: no later step is in flight."""
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        log_line = step % config.train.log_every == 0 or step == total
        if step == start + 1:  # the first step of this process: compilation included
            values["first_step_sec"] = _clock() - loop_start
            compilation_cache.return_free_heap()  # what compiling the init and the step freed
            meter.restart(step)
            if not progress.live and not log_line:
                _log(f"step {step}: compiled and ran in {values['first_step_sec']:.1f} s")
        elif settled and log_line:
            values.update(meter.rates(step))
            meter.restart(step)
        elif progress.live:
            values.update(meter.rates(step))  # the display between logged steps only
        history.append({"step": step, **values})
        if values.get("overflow"):
            log_line = True
            _log(
                f"step {step}: gradients overflowed at loss scale {2 * values['loss_scale']:g}; "
                f"update skipped, loss scale now {values['loss_scale']:g} "
                f"({int(values['overflows'])} overflows in all)"
            )
        elif values["skipped"]:
            log_line = True
            _log(
                f"step {step}: non-finite loss/gradients (loss {values['loss']}, grad norm "
                f"{values['grad_norm']}); update skipped ({int(values['nonfinite_streak'])} in a "
                f"row, {int(values['nonfinite_total'])} in all)"
            )
        if log_line:
            writer.write(step, values)
        progress.update(step, values, log_line)
        if values["nonfinite_streak"] >= config.train.max_nonfinite_steps:
            last = ckpt.latest_step()
            raise NonFiniteError(
                f"{int(values['nonfinite_streak'])} consecutive steps (up to step {step}) had a "
                f"non-finite loss, gradient or update (train.max_nonfinite_steps="
                f"{config.train.max_nonfinite_steps}); parameters are unchanged since step "
                f"{step - int(values['nonfinite_streak'])} and the newest checkpoint is step "
                f"{last}. Lower optim.lr, raise optim.warmup_steps or check the data."
            )

    def save(step: int) -> None:
        # The norm of the trained parameters after the last step (every step up to `step` is
        # finished here): finite iff they all are. Cannot fail, as bad updates are skipped.
        norm = history[-1]["param_norm"] if history else 0.0
        if not math.isfinite(norm):
            raise NonFiniteError(f"parameters at step {step} are not finite; not saving them")
        data_state = train_it.global_state()
        writer.flush()  # in a bucket, the metrics up to `step` are uploaded before its checkpoint
        try:
            ckpt.save(step, state, data_state, config, tokenizer_files)
        except OSError as e:
            raise OSError(f"writing the checkpoint of step {step} failed: {e}") from e

    step = start
    stopped_by = None
    with _StopRequests() as stop:
        try:
            loop_start = _clock()
            for step in range(start + 1, total + 1):
                batch = to_global(next(train_it), mesh, train_it.rows, train_it.global_batch)
                if rollouts is not None:  # online RL: this step's replies from `state`
                    batch = rollouts.train_batch(state, batch)
                state, step_metrics = train_step(state, batch)
                if pending is not None:
                    finish(*pending, settled=False)
                pending = (step, step_metrics)
                evaluate_now = step % config.train.eval_every == 0 or step == total
                stop_now = stop.requested(step)
                save_now = ckpt.should_save(step) or step == total or stop_now
                log_now = step % config.train.log_every == 0 or step == start + 1
                if evaluate_now or stop_now or save_now or log_now:
                    # Wait for this step: its metrics are checked before anything is saved, and
                    # a logged rate covers exactly the steps up to here.
                    finish(*pending, settled=True)
                    pending = None
                if evaluate_now and not stop_now:
                    result = evaluate(plan, state.params, config.train.eval_batches)
                    writer.write(step, result)
                    shown = "  ".join(
                        f"{k.removeprefix('eval_')} {v:.4f}"
                        for k, v in result.items()
                        if k not in ("eval_tokens", "eval_pairs", "eval_prompts")
                    )
                    _log(f"eval at step {step}: {shown}")
                    if downstream:
                        # One record once every task is done: a kill mid-way logs nothing, and
                        # the resumed run (from an earlier checkpoint) evaluates this step again.
                        result = downstream(state.params, tokenizer, mesh)
                        writer.write(step, result)
                        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items())
                        _log(f"tasks at step {step}: {shown}")
                if save_now:
                    save(step)
                if evaluate_now or save_now:
                    meter.restart(step)  # neither counts as training time
                if stop_now:
                    stopped_by = signal.Signals(stop.signal or signal.SIGTERM).name
                    break
            if pending is not None:
                finish(*pending, settled=True)
            ckpt.wait()
        finally:
            writer.close()
            try:
                ckpt.wait()  # let a save that started complete (no-op when all are done)
            finally:
                ckpt.close()
    if stopped_by:
        _log(f"{stopped_by}: saved step {step} in {ckpt.directory}; rerun the command to resume")
        return {
            "history": history,
            "sample": "",
            "state": state,
            "step": step,
            "stopped_by": stopped_by,
        }

    sample = ""
    compilation_cache.return_free_heap()
    writes_text = config.model.head == "lm" and config.model.causal and plan.task.trains_text
    if config.train.sample_tokens and writes_text:
        # Every process takes part (the parameters are spread over all of them); one prints.
        prompt = tokenizer.encode(config.train.sample_prompt) or [tokenizer.bos_id]
        prompt = [tokenizer.bos_id, *prompt] if config.data.add_bos else prompt
        prompt = prompt[: config.model.max_seq_len - 1]
        budget = min(config.train.sample_tokens, config.model.max_seq_len - len(prompt))
        try:
            with use_mesh(mesh, config.mesh.rules):
                new = generate(
                    config.model,
                    state.params,
                    [prompt],
                    budget,
                    key=config.seed,
                    chain=strategies(
                        config.train.sample_temperature, top_p=config.train.sample_top_p
                    ),
                    stop_tokens=[tokenizer.eos_id] if config.data.add_eos else [],
                    pad_id=tokenizer.pad_id,
                )
        except KeyboardInterrupt:  # training is done and saved: only the sample is cut short
            _log(f"interrupted the closing sample; the run is complete and saved at step {step}")
            new = None
        if new is not None:
            ids = prompt + new[0]
            # Bytes that are not valid UTF-8 (possible mid-training) print as U+FFFD.
            sample = tokenizer.decode(ids).encode("utf-8", "surrogateescape")
            sample = sample.decode("utf-8", "replace")
            if jax.process_index() == 0:
                print(sample, flush=True)
    return {"history": history, "sample": sample, "state": state, "step": step, "stopped_by": None}


def _downstream_tasks(config: RunConfig) -> Callable[..., dict[str, float]] | None:
    """`train.eval_tasks` as a function of (params, tokenizer, mesh) -> {"tasks/<task>/<metric>":
    value}; the tasks are resolved (files parsed, names looked up) now, before anything is
    compiled or written. None when the run has no tasks."""
    specs = [t.strip() for t in config.train.eval_tasks.split(",") if t.strip()]
    if not specs:
        return None
    from jaxlm.evals.scoring import check_scoring_model

    try:
        check_scoring_model(config.model)
    except ValueError as e:
        raise ValueError(f"train.eval_tasks={config.train.eval_tasks!r}: {e}") from e
    from jaxlm.evals.harness import JaxlmLM, headline, resolve_tasks, run_tasks

    resolve_tasks(specs)
    limit = config.train.eval_tasks_limit or None

    def run(params: Any, tokenizer: Any, mesh: Any) -> dict[str, float]:
        lm = JaxlmLM(config, params, tokenizer, mesh=mesh, log=_log)
        results = run_tasks(lm, specs, config.train.eval_tasks_fewshot, limit, seed=config.seed)
        return {f"tasks/{k}": v for k, v in headline(results).items()}

    return run


def eval_workdir(
    workdir: str | Path, max_batches: int = 0, step: int | None = None
) -> dict[str, float]:
    """`evaluate` on the checkpoint of `workdir` at `step` (default: the newest that restores)."""
    config, mesh, params, tokenizer = load_for_eval(workdir, step)
    return evaluate(RunPlan(config, mesh=mesh, tokenizer=tokenizer), params, max_batches)
