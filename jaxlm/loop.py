"""The training loop: the one imperative module (mesh, data, state, steps, eval, logs, saves)."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm import checkpoint, metrics
from jaxlm.configs.run import RunConfig
from jaxlm.data import make_iterator, make_tokenizer, pad_batch, to_global
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.sample import greedy_without_cache
from jaxlm.sharding import make_mesh
from jaxlm.train import (
    abstract_train_state,
    init_train_state,
    make_eval_step,
    make_train_step,
)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def check_run(config: RunConfig, tokenizer: Tokenizer) -> None:
    """Refuse configs that cannot work, before anything is compiled or written."""
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
            f"{config.model.max_seq_len}"
        )
    per_step = config.data.batch_size // jax.process_count()
    if per_step % config.train.microbatches:
        raise ValueError(
            f"the per-process batch ({per_step}) is not divisible by "
            f"train.microbatches={config.train.microbatches}"
        )


def evaluate(
    config: RunConfig,
    mesh: jax.sharding.Mesh,
    params: Any,
    tokenizer: Tokenizer,
    eval_step: Callable[..., Any],
    max_batches: int = 0,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the eval split (or its first `max_batches`)."""
    it = make_iterator(
        config.data, tokenizer, split=config.data.eval_split, mesh=mesh, num_epochs=1
    )
    per_process = config.data.batch_size // jax.process_count()
    nll = count = num_bytes = 0.0
    for i, batch in enumerate(it):
        if max_batches and i >= max_batches:
            break
        sums = jax.device_get(
            eval_step(params, to_global(pad_batch(batch, per_process, tokenizer.pad_id), mesh))
        )
        nll, count, num_bytes = (
            nll + float(sums["nll"]),
            count + float(sums["count"]),
            num_bytes + float(sums["bytes"]),
        )
    loss = nll / max(count, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 80.0)),
        "eval_bits_per_byte": nll / math.log(2) / max(num_bytes, 1.0),
        "eval_tokens": count,
    }


class _Progress:
    """A one-line progress display on a terminal; plain lines every `log_every` steps otherwise."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._tty = sys.stderr.isatty() and jax.process_index() == 0

    def update(self, step: int, values: dict[str, float], log_line: bool) -> None:
        text = (
            f"step {step}/{self._total}  loss {values['loss']:.4f}  "
            f"{values['tokens_per_sec']:,.0f} tok/s  mfu {values['mfu']:.2%}"
        )
        if self._tty:
            print("\r" + text, end="\n" if step == self._total else "", file=sys.stderr, flush=True)
        elif log_line:
            _log(text)


def train(config: RunConfig, workdir: str | Path) -> dict[str, Any]:
    """Train (resuming from the newest checkpoint in `workdir`), evaluate, save, and sample."""
    workdir = Path(workdir)
    tokenizer = make_tokenizer(config.data.tokenizer)
    check_run(config, tokenizer)
    mesh = make_mesh(config.mesh)
    train_it = make_iterator(config.data, tokenizer, seed=config.seed, mesh=mesh)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    if ckpt.latest_step() and (workdir / checkpoint.CONFIG_FILE).is_file():
        conflicts = checkpoint.resume_conflicts(checkpoint.load_run_config(workdir), config)
        if conflicts:
            details = "; ".join(
                f"{k}: saved {a!r}, now {b!r}"
                for k, a, b in ((k, *v) for k, v in sorted(conflicts.items()))
            )
            raise ValueError(
                f"{workdir} holds a run that cannot resume with this config ({details}); "
                "use another --workdir, or the saved values"
            )
    if jax.process_index() == 0:
        checkpoint.save_run_files(workdir, config, tokenizer)

    start = ckpt.latest_step() or 0
    if start:
        state, data_state = ckpt.restore(start, abstract_train_state(config, mesh))
        train_it.set_state(data_state)
        _log(f"resumed from step {start} in {ckpt.directory}")
    else:
        state = init_train_state(config, mesh, config.seed)
    train_step = make_train_step(config, mesh)
    eval_step = make_eval_step(config, mesh)

    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = metrics.flops_per_token(config.model, config.data.seq_len) * tokens_per_step
    peak, peak_source = metrics.peak_flops_per_device(config.train.peak_flops_per_device)
    peak_total = peak * jax.device_count()
    _log(
        f"jaxlm train: {metrics.param_count(config.model).total:,} params on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; "
        f"peak {peak_total:.3g} FLOP/s ({peak_source}); workdir {workdir}"
    )

    writer = metrics.MetricWriter(str(workdir), enabled=jax.process_index() == 0)
    progress = _Progress(config.train.steps)
    total = config.train.steps
    pending = None  # (step, device metrics): fetched after the next step is dispatched
    last_time, last_step = time.perf_counter(), start
    history: list[dict[str, float]] = []

    def finish(step: int, device_metrics: Any) -> None:
        nonlocal last_time, last_step
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        elapsed, steps = now - last_time, step - last_step
        last_time, last_step = now, step
        values["tokens_per_sec"] = steps * tokens_per_step / elapsed
        values["model_flops_per_sec"] = steps * flops_per_step / elapsed
        values["mfu"] = values["model_flops_per_sec"] / peak_total
        history.append({"step": step, **values})
        log_line = step % config.train.log_every == 0 or step == total
        if log_line:
            writer.write(step, values)
        progress.update(step, values, log_line)

    for step in range(start + 1, total + 1):
        batch = to_global(next(train_it), mesh)
        state, step_metrics = train_step(state, batch)
        if pending is not None:
            finish(*pending)
        pending = (step, step_metrics)
        if step % config.train.eval_every == 0 or step == total:
            finish(*pending)
            pending = None
            result = evaluate(
                config, mesh, state.params, tokenizer, eval_step, config.train.eval_batches
            )
            writer.write(step, result)
            _log(
                f"eval at step {step}: loss {result['eval_loss']:.4f}  "
                f"ppl {result['eval_perplexity']:.2f}  bits/byte {result['eval_bits_per_byte']:.4f}"
            )
            last_time = time.perf_counter()
        if ckpt.should_save(step) or step == total:
            ckpt.save(step, state, train_it.get_state(), config)
    if pending is not None:
        finish(*pending)
    ckpt.wait()
    writer.close()

    sample = ""
    if config.train.sample_tokens and jax.process_index() == 0:
        prompt = tokenizer.encode(config.train.sample_prompt) or [tokenizer.bos_id]
        prompt = [tokenizer.bos_id, *prompt] if config.data.add_bos else prompt
        params = jax.device_get(state.params)
        ids = greedy_without_cache(config.model, params, prompt, config.train.sample_tokens)
        # Bytes that are not valid UTF-8 (possible mid-training) print as U+FFFD.
        sample = tokenizer.decode(ids).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        print(sample, flush=True)
    ckpt.close()
    return {"history": history, "sample": sample, "state": state}


def load_for_eval(workdir: str | Path) -> tuple[RunConfig, jax.sharding.Mesh, Any, Tokenizer]:
    """The run config, a mesh, the newest checkpoint's params and the tokenizer of `workdir`."""
    config = checkpoint.load_run_config(workdir)
    tokenizer = make_tokenizer(str(Path(workdir) / checkpoint.TOKENIZER_DIR))
    # Evaluate on whatever devices this machine has: fsdp over all of them.
    flat = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    mesh = make_mesh(dataclasses.replace(config.mesh, **flat))
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(step, abstract_train_state(config, mesh))
    ckpt.close()
    return config, mesh, state.params, tokenizer


def eval_workdir(workdir: str | Path, max_batches: int = 0) -> dict[str, float]:
    config, mesh, params, tokenizer = load_for_eval(workdir)
    return evaluate(config, mesh, params, tokenizer, make_eval_step(config, mesh), max_batches)
