"""Rollouts of online RL: a batch of prompts → replies sampled from the current policy by the
compiled sampler → rewards → the scored batch that PPO and GRPO train on (`jaxlm.tasks.rl`).

The reward is either a Python function (`task.reward="file.py:name"` or `"module:name"`),
called on the host as `fn(replies, records) -> one number per reply` with the replies' text and
their prompt records (every field of the JSONL record), or a reward model (`task.reward_model`:
a `task.kind=reward` run's workdir), which scores prompt + reply on the devices.

Sampling is deterministic: step s samples with a key derived from the run's RNG and s, so a
resumed run redoes exactly the rollouts it would have done.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import checkpoint, distributed
from jaxlm.configs.overrides import call_user_function, load_python_file
from jaxlm.data import open_source
from jaxlm.data.chat import Template, encode_chat, get_template, stop_ids
from jaxlm.data.prompts import load_records
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model.transformer import Transformer, param_shardings
from jaxlm.sample import Greedy, Temperature, _model_continue, _model_start
from jaxlm.sharding import BATCH_AXES, use_mesh
from jaxlm.tasks.reference import load_reference

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig
    from jaxlm.run import RunPlan

RewardFn = Callable[[list[str], list[dict[str, Any]]], Any]


# --- the reward ---------------------------------------------------------------------------------


def load_reward_function(spec: str) -> RewardFn:
    """The function `spec` names: "path/to/file.py:name" or "package.module:name"."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(
            f"task.reward={spec!r} must name a function as 'file.py:name' or 'module:name'"
        )
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"task.reward={spec!r}: {where} does not exist")
        module = load_python_file(where)
    else:
        import importlib

        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"task.reward={spec!r}: cannot import {where!r} ({e})") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"task.reward={spec!r}: {where} has no function {name!r}")
    return fn


def check_rewards(values: Any, records: Sequence[dict[str, Any]], spec: str) -> np.ndarray:
    """The reward function's output as float32 [n], or a clear error naming what is wrong."""
    n = len(records)
    try:
        out = np.asarray(values, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"task.reward={spec!r} returned {type(values).__name__} {values!r:.80}, not {n} "
            f"numbers ({e})"
        ) from e
    if out.shape != (n,):
        raise ValueError(
            f"task.reward={spec!r} returned shape {out.shape} for {n} replies; it must return "
            "one number per reply"
        )
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"task.reward={spec!r} returned {out[i]} for reply {i} (record "
            f"{records[i].get('prompt')!r:.60}); rewards must be finite numbers"
        )
    return out.astype(np.float32)


def _reward_model_facts(workdir: str, what: str) -> tuple[int, RunConfig]:
    steps = checkpoint.complete_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{what}: {workdir} holds no complete checkpoint of a run")
    return steps[-1], checkpoint.saved_config(workdir, steps[-1])


def check_reward(config: RunConfig, tokenizer: Tokenizer, source: Sequence[str] | None) -> None:
    """Exactly one reward is given and it can score this run's replies: a function that loads
    and returns one finite number for a probe reply to the first prompt, or a reward model with
    a score head, this run's tokenizer and room for a whole row."""
    task = config.task
    flag = f"task.kind={task.kind}"
    if bool(task.reward) == bool(task.reward_model):
        raise ValueError(
            f"{flag} needs one reward: task.reward='file.py:function' (a Python function of the "
            "replies and their records) or task.reward_model=DIR (a task.kind=reward run)"
            + ("; both are set" if task.reward else "")
        )
    if task.reward:
        fn = load_reward_function(task.reward)
        records = load_records([source[0]]) if source is not None and len(source) else [{}]
        probe = call_user_function(task.reward, lambda: fn([""], records))
        check_rewards(probe, records, task.reward)
        return
    what = f"task.reward_model={task.reward_model!r}"
    step, rm = _reward_model_facts(task.reward_model, what)
    if rm.model.head != "score":
        raise ValueError(f"{what} is not a reward model (model.head={rm.model.head!r})")
    if rm.model.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"{what} has model.vocab_size={rm.model.vocab_size}, the policy "
            f"{config.model.vocab_size}: it must read the policy's tokens (the same tokenizer)"
        )
    saved = Path(task.reward_model) / checkpoint.CHECKPOINT_DIR / str(step) / "tokenizer"
    meta = saved / "metadata"
    if meta.is_file() and json.loads(meta.read_text()) != checkpoint.tokenizer_files(tokenizer):
        raise ValueError(
            f"{what} was trained with another tokenizer than data.tokenizer="
            f"{config.data.tokenizer!r}: it must read the policy's tokens"
        )
    template = get_template(task.chat_template, tokenizer)
    need = config.data.seq_len + len(turn_tail(template, tokenizer, stop_ids(template, tokenizer)))
    room = rm.model.max_seq_len - rm.model.prompt_tokens
    if room < need:
        raise ValueError(
            f"{what} reads at most {room} tokens (model.max_seq_len less prompt_tokens), fewer "
            f"than a rollout's {need} (data.seq_len and the end of the assistant's turn)"
        )


# --- rollouts ------------------------------------------------------------------------------------


def assemble(
    prompt_BP: jax.Array,
    lengths_B: jax.Array,
    reply_BN: jax.Array,
    num_B: jax.Array,
    pad_id: int,
) -> dict[str, jax.Array]:
    """Rows [prompt, reply, pad] of length P + N as a packed batch: `tokens`, `targets`,
    `positions`, `segment_ids` (1 on the row's tokens) and `mask` (the targets that are reply
    tokens: the actions). A row of length 0 (no prompt) holds nothing."""
    b, p = prompt_BP.shape
    n = reply_BN.shape[1]
    t = jnp.arange(p + n + 1)[None, :]
    j = t - lengths_B[:, None]  # index into the reply
    in_reply = (j >= 0) & (j < num_B[:, None])
    prompt = jnp.pad(prompt_BP, ((0, 0), (0, n + 1)), constant_values=pad_id)
    reply = jnp.take_along_axis(reply_BN, jnp.clip(j, 0, n - 1), axis=1)
    seq = jnp.where(t < lengths_B[:, None], prompt, jnp.where(in_reply, reply, pad_id))
    seq = seq.astype(jnp.int32)
    end = (lengths_B + num_B)[:, None]
    return {
        "tokens": seq[:, :-1],
        "targets": seq[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(p + n, dtype=jnp.int32), (b, p + n)),
        "segment_ids": (t[:, :-1] < end).astype(jnp.int32),
        "mask": in_reply[:, 1:],
    }


def reply_texts(
    reply_BN: np.ndarray, num_B: np.ndarray, tokenizer: Tokenizer, stops: Sequence[int]
) -> list[str]:
    """Each reply's text, without the stop token that ended it."""
    out = []
    for ids, n in zip(reply_BN, num_B, strict=True):
        out.append(tokenizer.decode([int(i) for i in ids[:n] if int(i) not in stops]))
    return out


def turn_tail(template: Template, tokenizer: Tokenizer, stops: Sequence[int]) -> list[int]:
    """The tokens a rendered chat has after the stop token that ends an assistant turn (e.g.
    the newline after chatml's <|im_end|>): what a sampled reply lacks to look like the chats
    a reward model was trained on."""
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids, train = encode_chat(turns, tokenizer, template)
    ends = [i for i, (t, m) in enumerate(zip(ids, train, strict=True)) if m and t in stops]
    return list(ids[ends[-1] + 1 :]) if ends else []


def _host(x: jax.Array) -> np.ndarray:
    """The whole global array on this host (gathered from every process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Rollouts:
    """The rollout functions of `plan`'s PPO/GRPO run, compiled once with its shardings."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan, self.task, self.config = plan, plan.task, plan.config
        task = self.config.task
        self.tokenizer = plan.tokenizer
        template = self.task.template(self.tokenizer)
        self.stops = stop_ids(template, self.tokenizer)
        self.tail = turn_tail(template, self.tokenizer, self.stops)
        self.reward_fn = load_reward_function(task.reward) if task.reward else None
        self.reward_params, self.reward_config = None, None
        if task.reward_model:
            from jaxlm.run import load_for_eval

            rm_config, _, params, _ = load_for_eval(task.reward_model)
            self.reward_config = rm_config.model
            shardings = param_shardings(rm_config.model, plan.mesh, self.config.mesh.rules)
            self.reward_params = jax.device_put(params, shardings)
        self.reference_params = load_reference(plan)
        self._records: dict[str, list[dict[str, Any]]] = {}
        batch = NamedSharding(plan.mesh, PartitionSpec(BATCH_AXES))
        replicated = NamedSharding(plan.mesh, PartitionSpec())
        params = plan.state_shardings.params
        self._batch_sharding = batch
        self._sample = {
            greedy: jax.jit(
                functools.partial(self._sample_fn, greedy=greedy),
                in_shardings=(params, replicated, replicated, batch, batch),
                out_shardings=(batch, batch),
            )
            for greedy in (False, True)
        }
        out = {k: batch for k in self.task.batch_spec()}
        self._score = jax.jit(self._score_fn, out_shardings=out)

    # --- on the devices ---------------------------------------------------------------------
    def _sample_fn(
        self,
        params: Any,
        rng: jax.Array,
        step: jax.Array,
        prompt_BP: jax.Array,
        lengths_B: jax.Array,
        *,
        greedy: bool,
    ) -> tuple[jax.Array, jax.Array]:
        model, task = self.config.model, self.config.task
        n = task.max_new_tokens
        key = jax.random.fold_in(jax.random.split(jax.random.wrap_key_data(rng))[1], step)
        chain = (Greedy(),) if greedy else (Temperature(task.temperature),)
        b, p = prompt_BP.shape
        max_new_B = jnp.where(lengths_B > 0, n, 0).astype(jnp.int32)
        stops = self.stops or [-1]
        stop_BS = jnp.broadcast_to(jnp.asarray(stops, jnp.int32), (b, len(stops)))
        cache_len = p + n + model.prompt_tokens
        pad = self.tokenizer.pad_id
        lengths = jnp.maximum(lengths_B, 1)
        state = _model_start(
            params, prompt_BP, lengths, key, max_new_B, stop_BS, model, chain, n, cache_len, pad
        )
        state = _model_continue(params, state, key, max_new_B, stop_BS, n, model, chain, pad)
        return state.tokens_BN, state.num_B

    def _score_fn(
        self,
        params: Any,
        reward_params: Any,
        reference_params: Any,
        prompt_BP: jax.Array,
        lengths_B: jax.Array,
        reply_BN: jax.Array,
        num_B: jax.Array,
        reward_B: jax.Array,
    ) -> dict[str, jax.Array]:
        task = self.task
        rows = assemble(prompt_BP, lengths_B, reply_BN, num_B, self.tokenizer.pad_id)
        valid = lengths_B > 0
        old_logp, _, aux = task.policy(params, rows)
        ref_logp = task.reference_log_probs(params, rows, reference_params)
        if reward_params is not None:
            reward_B = self._model_rewards(reward_params, prompt_BP, lengths_B, reply_BN, num_B)
        zeros = jnp.zeros_like(old_logp)
        values = aux["values"] * rows["mask"] if "values" in aux else zeros
        out = {
            **rows,
            "old_logp": old_logp,
            "ref_logp": ref_logp,
            "old_values": values,
            "reward": jnp.where(valid, reward_B, 0.0),
            "valid": valid,
            "length": num_B.astype(jnp.int32),
        }
        out["advantages"], out["returns"] = task.advantages(out)
        return {k: jax.lax.stop_gradient(v) for k, v in out.items()}

    def _model_rewards(
        self,
        reward_params: Any,
        prompt_BP: jax.Array,
        lengths_B: jax.Array,
        reply_BN: jax.Array,
        num_B: jax.Array,
    ) -> jax.Array:
        """The reward model's score at the last token of prompt + reply, where a reward model
        reads it in training: a reply that ended its turn gets the rest of the template's end
        of turn after its stop token (e.g. chatml's newline), as the rendered chat has."""
        tail = self.tail
        if tail:
            n, k = reply_BN.shape[1], len(tail)
            last = jnp.take_along_axis(reply_BN, jnp.maximum(num_B - 1, 0)[:, None], axis=1)
            stopped = (num_B > 0) & jnp.isin(last[:, 0], jnp.asarray(self.stops, jnp.int32))
            j = jnp.arange(n + k)[None, :] - num_B[:, None]
            extended = jnp.pad(reply_BN, ((0, 0), (0, k)), constant_values=self.tokenizer.pad_id)
            tail_tokens = jnp.asarray(tail, jnp.int32)[jnp.clip(j, 0, k - 1)]
            use = stopped[:, None] & (j >= 0) & (j < k)
            reply_BN = jnp.where(use, tail_tokens, extended)
            num_B = num_B + k * stopped.astype(num_B.dtype)
        rows = assemble(prompt_BP, lengths_B, reply_BN, num_B, self.tokenizer.pad_id)
        scores, _, _ = Transformer(self.reward_config).apply(
            {"params": reward_params}, rows["tokens"], rows["positions"], rows["segment_ids"]
        )
        last = jnp.maximum(lengths_B + num_B - 1, 0)[:, None]
        return jnp.take_along_axis(scores[..., 0].astype(jnp.float32), last, axis=1)[:, 0]

    # --- on the host ----------------------------------------------------------------------------
    def records(self, split: str) -> list[dict[str, Any]]:
        if split not in self._records:
            data = self.config.data
            source = open_source(data.dataset, split, data_dir=data.data_dir, text_key=RECORD_KEY)
            self._records[split] = load_records(source)
        return self._records[split]

    def _rewards(
        self, batch: dict[str, jax.Array], reply: jax.Array, num: jax.Array, split: str
    ) -> jax.Array:
        b = self.config.data.batch_size
        if self.reward_fn is None:
            host = np.zeros((b,), np.float32)
        else:
            lengths, index = _host(batch["lengths"]), _host(batch["record"])
            reply_h, num_h = _host(reply), _host(num)
            rows = np.flatnonzero(lengths > 0)
            table = self.records(split)
            records = [table[int(index[r])] for r in rows]
            texts = reply_texts(reply_h[rows], num_h[rows], self.tokenizer, self.stops)
            host = np.zeros((b,), np.float32)
            host[rows] = self._call_reward(texts, records)
        return jax.make_array_from_callback((b,), self._batch_sharding, lambda i: host[i])

    def _call_reward(self, texts: list[str], records: list[dict[str, Any]]) -> np.ndarray:
        """The checked rewards, computed once, on process 0, and shared with the others (an
        error there is raised on every process)."""
        spec = self.config.task.reward
        if jax.process_count() == 1:
            values = call_user_function(spec, lambda: self.reward_fn(texts, records))
            return check_rewards(values, records, spec)
        out: Any = None
        if jax.process_index() == 0:
            try:
                values = call_user_function(spec, lambda: self.reward_fn(texts, records))
                out = check_rewards(values, records, spec).tolist()
            except Exception as e:  # shared, so no process waits for process 0 forever
                out = f"{type(e).__name__}: {e}"
        out = distributed.allgather_json(out)[0]
        if isinstance(out, str):
            raise ValueError(f"the reward function failed on process 0: {out}")
        return np.asarray(out, np.float32)

    def _run(
        self, params: Any, rng: Any, step: Any, batch: dict[str, jax.Array], greedy: bool
    ) -> dict[str, jax.Array]:
        split = self.config.data.eval_split if greedy else self.config.data.train_split
        with use_mesh(self.plan.mesh, self.plan.rules):
            reply, num = self._sample[greedy](params, rng, step, batch["tokens"], batch["lengths"])
            reward = self._rewards(batch, reply, num, split)
            return self._score(
                params,
                self.reward_params,
                self.reference_params,
                batch["tokens"],
                batch["lengths"],
                reply,
                num,
                reward,
            )

    def train_batch(self, state: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The scored rollout of this step: replies sampled at `task.temperature` with the
        step's key from `state`'s parameters."""
        try:
            return self._run(state.params, state.rng, state.step, batch, greedy=False)
        except ValueError as e:
            raise ValueError(f"step {int(state.step) + 1}: {e}") from e

    def eval_batch(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The scored greedy replies to the eval split's prompts."""
        zero = jnp.zeros((), jnp.int32)
        return self._run(params, jnp.zeros((2,), jnp.uint32), zero, batch, greedy=True)
