"""A new jaxlm workdir around imported parameters: a complete, resumable step-0 checkpoint.

The checkpoint holds everything `jaxlm train` writes (parameters, a fresh optimizer state at
step 0, the data iterator's starting position, the run config and the tokenizer), so
`jaxlm sample`, `jaxlm eval` and `jaxlm train --workdir` (fine-tuning, "resuming" from step 0)
work on it unchanged. The data and optimizer settings of that fine-tune are the run config's:
choose them at import time (`run_config`), since a resumed run may not change the dataset.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlm import checkpoint, storage
from jaxlm.configs.model import ModelConfig
from jaxlm.configs.run import RunConfig


def write_workdir(
    workdir: str | Path,
    config: ModelConfig,
    make_params: Callable[[jax.sharding.Mesh, str], Any],
    *,
    run_config: RunConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: str | None = None,
    tokenizer: Any = None,
    tokenizer_spec: str | None = None,
) -> Path:
    """Write a jaxlm workdir whose step-0 checkpoint holds `make_params(mesh, rules)`.

    `run_config` supplies everything but the model (default `RunConfig()`, with `data.seq_len`
    capped at the model's length); its `data.tokenizer` is replaced by the imported tokenizer
    (`tokenizer`, or `tokenizer_spec` for `make_tokenizer`, else the byte tokenizer), which is
    saved in the workdir. `mesh` defaults to `run_config.mesh` over all devices.
    """
    from jaxlm.data import ByteTokenizer, make_tokenizer
    from jaxlm.run import RunPlan

    workdir = storage.as_path(workdir, absolute=True)
    if checkpoint.complete_steps(workdir) or (workdir / checkpoint.CONFIG_FILE).exists():
        raise ValueError(f"{str(workdir)!r} already holds a jaxlm run; import into a new workdir")
    if tokenizer_spec is not None:
        tokenizer = make_tokenizer(tokenizer_spec)
    elif tokenizer is None:
        print(
            "note: no tokenizer.json or tokenizer.model found; using jaxlm's byte tokenizer",
            file=sys.stderr,
        )
        tokenizer = ByteTokenizer()
    spec = (
        "byte" if isinstance(tokenizer, ByteTokenizer) else str(workdir / checkpoint.TOKENIZER_DIR)
    )
    run = run_config or RunConfig()
    seq_len = run.data.seq_len if run_config else min(run.data.seq_len, config.max_seq_len)
    run = dataclasses.replace(
        run,
        model=config,
        data=dataclasses.replace(run.data, tokenizer=spec, seq_len=seq_len),
        mesh=dataclasses.replace(run.mesh, rules=rules or run.mesh.rules),
    )
    if config.head == "score" and run.task.kind == "lm":
        run = dataclasses.replace(run, task=dataclasses.replace(run.task, kind="reward"))
    if not config.causal and run.task.kind == "lm":  # an encoder (BERT) trains masked LM
        run = dataclasses.replace(run, task=dataclasses.replace(run.task, kind="mlm"))
    # A reward model's pairs are not known yet: its task's data checks wait for its training.
    plan = RunPlan(run, mesh=mesh, tokenizer=tokenizer, check_data=config.head == "lm")
    if jax.process_index() == 0:
        checkpoint.check_workdir(workdir, plan.checkpoint_bytes())
    # The data position first: a dataset that cannot be read fails before the weights are read.
    data_state = plan.make_iterator().global_state()
    state = plan.state_from_params(make_params(plan.mesh, run.mesh.rules))
    ckpt = checkpoint.Checkpointer(workdir, run.checkpoint)
    try:
        ckpt.save(0, state, data_state, run, checkpoint.tokenizer_files(tokenizer))
        ckpt.wait()
    finally:
        ckpt.close()
    if jax.process_index() == 0:
        checkpoint.save_run_files(workdir, run, tokenizer)
    return workdir
