"""`task.kind=ppo` and `task.kind=grpo`: online RL on prompts, with replies sampled every step
from the current policy by the compiled sampler (`jaxlm.tasks.rollout`).

A step: sample replies to the batch's prompts (GRPO: `group_size` per prompt) at
`task.temperature`; score each with the reward (a Python function or a reward model); take
`task.ppo_epochs` updates of the clipped objective on them. The policy is the model with its
adapters (LoRA or prompt tuning) and the reference the same model without them (no second copy
of the weights); a full fine-tune's reference is a frozen copy of the model it started from
(`jaxlm.tasks.reference`). The KL penalty keeps the policy near it:
- PPO (Ouyang et al., 2022): the per-token reward is −kl_coef · (log π − log π_ref), plus the
  reply's reward at its last token; advantages by GAE over a value head sharing the policy's
  layers (`model.value_head`), whitened over the batch; loss = clipped surrogate + vf_coef ·
  clipped value loss.
- GRPO (Shao et al., 2024): no value model; a reply's advantage is its reward against its
  group's (mean and standard deviation), on every token of the reply; loss = clipped surrogate
  + kl_coef · the k3 estimate of KL(π ‖ π_ref).
Log-probabilities are those of the sampling distribution, softmax(logits / temperature). The
loss is a mean over the batch's reply tokens.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlm import losses
from jaxlm.data import make_iterator, open_source
from jaxlm.data.chat import Template, get_template
from jaxlm.data.pipeline import StreamIterator
from jaxlm.data.prompts import build_prompt_dataset, empty_prompts, prompt_stats
from jaxlm.data.sources import RECORD_KEY
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.tasks import rl_losses
from jaxlm.tasks.base import Task, adapterless_logits, check_causal
from jaxlm.tasks.reference import check_reference_given, reference_logits


class RLTask(Task):
    """What PPO and GRPO share: prompts, rollouts, the clipped policy loss and the metrics."""

    uses_values: ClassVar[bool] = False

    @property
    def updates_per_step(self) -> int:  # type: ignore[override]
        return self.config.task.ppo_epochs

    @property
    def group(self) -> int:
        return self.config.task.group_size if self.kind == "grpo" else 1

    @property
    def budget(self) -> int:
        """Prompt tokens a row has room for (the rest of data.seq_len is the reply's)."""
        return self.config.data.seq_len - self.config.task.max_new_tokens

    def template(self, tokenizer: Tokenizer) -> Template:
        return get_template(self.config.task.chat_template, tokenizer)

    # --- checks and data ------------------------------------------------------------------
    def check(self, tokenizer: Tokenizer) -> None:
        from jaxlm.tasks.rollout import check_reward

        config, task, data = self.config, self.config.task, self.config.data
        flag = f"task.kind={self.kind}"
        if config.model.head != "lm":
            raise ValueError(f"{flag} trains a language model; model.head={config.model.head!r}")
        check_causal(config)
        check_reference_given(config)
        for name, value in (
            ("model.lora.dropout", config.model.lora.dropout),
            ("model.moe.router_jitter", config.model.moe.router_jitter),
        ):
            if value:
                raise ValueError(
                    f"{name}={value}: {flag}'s ratio π/π_old compares the policy with itself at "
                    f"rollout time, which noise in the update would bias; set {name}=0"
                )
        if self.uses_values and not config.model.value_head:
            raise ValueError(
                f"{flag} needs a critic: set model.value_head=true (it starts fresh on a run "
                "started with --init-from)"
            )
        if self.budget < 1:
            raise ValueError(
                f"task.max_new_tokens={task.max_new_tokens} leaves no room for a prompt in "
                f"data.seq_len={data.seq_len}; raise data.seq_len or lower task.max_new_tokens"
            )
        if self.kind == "grpo":
            if task.group_size < 2:
                raise ValueError(
                    f"task.group_size={task.group_size}: GRPO compares the replies of a group; "
                    "give at least 2"
                )
            streams = data.streams or jax.process_count()
            per_stream = data.batch_size // max(streams, 1)
            if per_stream % task.group_size:
                raise ValueError(
                    f"data.batch_size={data.batch_size} over {streams} data stream(s) gives "
                    f"{per_stream} rows each, not a multiple of task.group_size="
                    f"{task.group_size}"
                )
        template = self.template(tokenizer)
        first = None
        for split in (data.train_split, data.eval_split):
            source = open_source(data.dataset, split, data_dir=data.data_dir, text_key=RECORD_KEY)
            stats = prompt_stats(source, tokenizer, template, self.budget)
            if split == data.train_split:
                if stats.too_long == stats.prompts:
                    raise ValueError(
                        f"{source!r}: no prompt fits ({stats.summary(self.budget)}); raise "
                        "data.seq_len"
                    )
                first = source
            if jax.process_index() == 0:
                print(f"{self.kind} {split}: {stats.summary(self.budget)}", file=sys.stderr)
        check_reward(self.config, tokenizer, first)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        b, t = self.config.data.batch_size, self.config.data.seq_len
        ints = ("tokens", "targets", "segment_ids", "positions")
        floats = ("old_logp", "ref_logp", "advantages", "returns", "old_values")
        return {
            **{k: ((b, t), jnp.int32) for k in ints},
            "mask": ((b, t), jnp.bool_),
            **{k: ((b, t), jnp.float32) for k in floats},
            "reward": ((b,), jnp.float32),
            "valid": ((b,), jnp.bool_),
            "length": ((b,), jnp.int32),
        }

    def make_iterator(
        self,
        tokenizer: Tokenizer,
        *,
        split: str | None = None,
        seed: int = 0,
        mesh: Mesh | None = None,
        num_epochs: int | None = None,
        num_streams: int | None = None,
    ) -> StreamIterator:
        """Batches of prompts (`jaxlm.data.prompts`), which the rollouts turn into replies."""
        # Evaluation replies greedily, once per prompt.
        train = split in (None, self.config.data.train_split) and num_epochs is None
        build = functools.partial(
            build_prompt_dataset,
            template=self.template(tokenizer),
            budget=self.budget,
            group=self.group if train else 1,
        )
        return make_iterator(
            self.config.data,
            tokenizer,
            split=split,
            seed=seed,
            mesh=mesh,
            num_epochs=num_epochs,
            num_streams=num_streams,
            text_key=RECORD_KEY,
            dataset_fn=build,
            empty=lambda n: empty_prompts(n, self.budget, tokenizer.pad_id),
        )

    def make_rollouts(self, plan: Any) -> Any:
        from jaxlm.tasks.rollout import Rollouts

        return Rollouts(plan)

    def trainable(self, name: str) -> bool:
        value = self.uses_values and name.startswith("value/")
        return super().trainable(name) or value

    # --- log-probs, values, advantages ----------------------------------------------------
    def _scaled(self, logits: jax.Array) -> jax.Array:
        t = self.config.task.temperature
        return logits if t == 1.0 else logits.astype(jnp.float32) / t

    def policy(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(log π of each target [B, T], the sampling logits, the model's aux outputs)."""
        logits, aux = self.forward(params, batch, rng)
        logits = self._scaled(logits)
        return losses.token_log_probs(logits, batch["targets"], batch["mask"]), logits, aux

    def reference_log_probs(
        self, params: Any, batch: dict[str, jax.Array], reference: Any = None
    ) -> jax.Array:
        """log π_ref of each target at the same temperature: the frozen `reference` parameters
        (a full fine-tune's, `jaxlm.tasks.reference`), else the model without its adapters."""
        model = self.config.model
        if reference is None:
            logits = adapterless_logits(model, params, batch)
        else:
            logits = reference_logits(model, reference, batch)
        return losses.token_log_probs(self._scaled(logits), batch["targets"], batch["mask"])

    def advantages(
        self, rollout: dict[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:  # pragma: no cover - abstract
        """(advantages [B, T], returns [B, T]) of a scored rollout."""
        raise NotImplementedError

    # --- the loss -------------------------------------------------------------------------
    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

    def extra_loss(
        self, batch: dict[str, jax.Array], logp: jax.Array, aux: dict[str, jax.Array]
    ) -> dict[str, tuple[float, jax.Array]]:
        """Loss sums beyond the policy's: {name: (coefficient, sum)}."""
        return {}

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        task, mask = self.config.task, batch["mask"]
        logp, logits, aux = self.policy(params, batch, rng)
        terms = rl_losses.clipped_policy_loss(
            logp, batch["old_logp"], batch["advantages"], mask, task.clip_eps
        )
        extra = self.extra_loss(batch, logp, aux)
        entropy = losses.token_entropy(jax.lax.stop_gradient(logits), mask)
        loss = terms["policy_loss"] + sum((c * v for c, v in extra.values()), jnp.zeros(()))
        return {
            "loss": loss,
            **terms,
            **{k: v for k, (_, v) in extra.items()},
            "entropy": jnp.sum(entropy),
            **self.aux_terms(aux),
        }

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        per_token = {k: terms[k] / total for k in ("loss", "policy_loss", "approx_kl", "entropy")}
        extra = {k: terms[k] / total for k in self.extra_metric_names}
        return {
            **per_token,
            "clip_fraction": terms["clipped"] / total,
            **extra,
            **rollout_metrics(batch),
        }

    extra_metric_names: ClassVar[tuple[str, ...]] = ()

    # --- evaluation (greedy replies to the eval split's prompts) --------------------------
    def eval_sums(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        w = batch["valid"].astype(jnp.float32)
        kl = jnp.sum((batch["old_logp"] - batch["ref_logp"]) * batch["mask"], axis=1)
        return {
            "reward": jnp.sum(batch["reward"] * w),
            "length": jnp.sum(batch["length"] * w),
            "kl": jnp.sum(kl * w),
            "prompts": jnp.sum(w),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("prompts", 0.0), 1.0)
        return {
            "eval_reward": sums.get("reward", 0.0) / n,
            "eval_response_length": sums.get("length", 0.0) / n,
            "eval_kl": sums.get("kl", 0.0) / n,
            "eval_prompts": sums.get("prompts", 0.0),
        }


def rollout_metrics(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means over a rollout's replies: reward (and its spread), length, the KL of the sampling
    policy to the reference (the sum over a reply's tokens of log π − log π_ref)."""
    w = batch["valid"].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    reward = jnp.sum(batch["reward"] * w) / n
    kl = jnp.sum((batch["old_logp"] - batch["ref_logp"]) * batch["mask"], axis=1)
    return {
        "reward": reward,
        "reward_std": jnp.sqrt(jnp.sum(jnp.square(batch["reward"] - reward) * w) / n),
        "response_length": jnp.sum(batch["length"] * w) / n,
        "kl": jnp.sum(kl * w) / n,
        "replies": jnp.sum(w),
    }


class PPOTask(RLTask):
    """PPO with a value head, GAE and the KL penalty in the reward."""

    kind = "ppo"
    uses_values = True
    extra_metric_names = ("value_loss",)

    def advantages(self, rollout: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        task, mask = self.config.task, rollout["mask"]
        kl = (rollout["old_logp"] - rollout["ref_logp"]) * mask
        last = mask & ~jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # each reply's last action
        rewards = -task.kl_coef * kl + jnp.where(last, rollout["reward"][:, None], 0.0)
        adv, returns = rl_losses.gae(
            rewards, rollout["old_values"], mask, task.gamma, task.gae_lambda
        )
        return rl_losses.whiten(adv, mask), returns

    def extra_loss(
        self, batch: dict[str, jax.Array], logp: jax.Array, aux: dict[str, jax.Array]
    ) -> dict[str, tuple[float, jax.Array]]:
        task = self.config.task
        value_loss = rl_losses.clipped_value_loss(
            aux["values"], batch["old_values"], batch["returns"], batch["mask"], task.value_clip
        )
        return {"value_loss": (task.vf_coef, value_loss)}


class GRPOTask(RLTask):
    """GRPO: group-relative advantages, the KL to the reference in the loss."""

    kind = "grpo"
    extra_metric_names = ("kl_loss",)

    def advantages(self, rollout: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        adv = rl_losses.group_advantages(rollout["reward"], rollout["valid"], self.group)
        mask = rollout["mask"]
        return adv[:, None] * mask, jnp.zeros_like(rollout["old_logp"])

    def extra_loss(
        self, batch: dict[str, jax.Array], logp: jax.Array, aux: dict[str, jax.Array]
    ) -> dict[str, tuple[float, jax.Array]]:
        kl = rl_losses.k3_kl(logp, batch["ref_logp"], batch["mask"])
        return {"kl_loss": (self.config.task.kl_coef, jnp.sum(kl))}
