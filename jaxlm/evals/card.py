"""`jaxlm eval --card`: what a model card reports, in one JSON object.

Parameters (total, active per token, embedding), training tokens and FLOPs of this run, the
held-out loss and bits per byte, harness task results when tasks are given, and the decode speed
measured on this machine (one prompt, greedy, after a compile).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from jaxlm.configs.run import RunConfig
from jaxlm.metrics import flops_per_token, param_count

DECODE_PROMPT_TOKENS = 16
DECODE_NEW_TOKENS = 128


def training_figures(config: RunConfig, step: int) -> dict[str, Any]:
    """Tokens and FLOPs of the `step` training steps of this run (6N + attention per token, as
    `jaxlm info` counts them); an imported model that this run never trained reports 0."""
    tokens = step * config.data.batch_size * config.data.seq_len
    out: dict[str, Any] = {
        "step": step,
        "tokens": tokens,
        "flops": tokens * flops_per_token(config.model, config.data.seq_len),
    }
    if config.train.init_from:
        out["started_from"] = config.train.init_from  # its own training is not counted here
    return out


def decode_speed(config: RunConfig, params: Any, tokenizer: Any, mesh: Any) -> dict[str, float]:
    """Greedy decode tokens per second for one prompt on this machine (compile excluded)."""
    from jaxlm import sample
    from jaxlm.sharding import use_mesh

    window = config.model.max_seq_len - config.model.prompt_tokens
    prompt_len = min(DECODE_PROMPT_TOKENS, window // 2)
    new = min(DECODE_NEW_TOKENS, window - prompt_len)
    prompt = [[3 + (i % max(config.model.vocab_size - 3, 1)) for i in range(prompt_len)]]
    with use_mesh(mesh, config.mesh.rules):
        kwargs = dict(pad_id=tokenizer.pad_id)  # no stop token: every row runs its budget
        sample.generate(config.model, params, prompt, new, **kwargs)  # compile
        start = time.perf_counter()
        out = sample.generate(config.model, params, prompt, new, **kwargs)
        seconds = time.perf_counter() - start
    made = len(out[0])
    return {
        "decode_tokens_per_s": made / seconds,
        "decode_new_tokens": made,
        "decode_batch": 1,
        "device": jax.devices()[0].device_kind,
    }


def model_card(
    workdir: str | os.PathLike,
    step: int | None = None,
    tasks: Sequence[str] = (),
    eval_batches: int = 0,
    **task_kwargs: Any,
) -> dict[str, Any]:
    """The model card of the run in `workdir` at `step` (default: the newest checkpoint)."""
    from jaxlm.loop import evaluate
    from jaxlm.run import RunPlan, load_step_for_eval

    found, config, mesh, params, tokenizer = load_step_for_eval(workdir, step)
    count = param_count(config.model)
    card: dict[str, Any] = {
        "workdir": str(workdir),
        "parameters": {
            "total": count.total,
            "active": count.active,
            "embedding": count.embedding,
            "non_embedding": count.non_embedding,
        },
        "model": {
            "layers": config.model.num_layers,
            "d_model": config.model.d_model,
            "heads": config.model.num_heads,
            "vocab_size": config.model.vocab_size,
            "max_seq_len": config.model.max_seq_len,
            "moe_experts": config.model.moe.num_experts,
        },
        "training": training_figures(config, found),
    }
    plan = RunPlan(config, mesh=mesh, tokenizer=tokenizer)
    try:
        card["held_out"] = evaluate(plan, params, eval_batches)
    except (FileNotFoundError, ValueError) as e:  # e.g. an imported model with no eval data
        card["held_out"] = {"unavailable": str(e)[:300]}
    if tasks:
        from jaxlm.evals.harness import JaxlmLM, headline, run_tasks

        lm = JaxlmLM(config, params, tokenizer, mesh=mesh)
        card["tasks"] = headline(run_tasks(lm, tasks, **task_kwargs))
    if config.model.causal and config.model.head == "lm":
        card["speed"] = decode_speed(config, params, tokenizer, mesh)
    else:
        card["speed"] = {"unavailable": "decoding needs a causal model with a language-model head"}
    return card
