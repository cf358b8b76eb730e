"""`task.kind=distill`: knowledge distillation (Hinton et al., 2015) on packed text.

A frozen teacher (`task.teacher`: a jaxlm run, or a model imported with `jaxlm convert
--from-hf`, with the student's tokenizer) scores every batch inside the same train step; the
student's per-token loss is

    α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(z_s, next token)

with α = `task.distill_alpha` and T = `task.distill_temperature` (T² keeps the soft term's
gradient scale independent of T). The teacher's parameters are loaded once, before anything is
written, in the student's mesh and logical rules; they enter the compiled step as an argument
(never updated, no gradient or optimizer state, never checkpointed with the student), so its
logits stay on the devices. Evaluation is the student's own held-out loss, as for `lm`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm import checkpoint, losses
from jaxlm.configs.model import ModelConfig
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.model.transformer import Transformer, abstract_params, param_shardings
from jaxlm.tasks.lm import LMTask

TEACHER = "__teacher__"  # the teacher's parameters' key in the step's frozen inputs


def distill_kl_sums(
    student_BTV: jax.Array, teacher_BTV: jax.Array, mask_BT: jax.Array, temperature: float
) -> jax.Array:
    """Σ over masked tokens of KL(softmax(teacher / T) ‖ softmax(student / T)), in float32."""
    t = jnp.float32(temperature)
    log_p = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
    log_q = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
    kl_BT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(jnp.where(mask_BT, kl_BT, 0.0))


class DistillTask(LMTask):
    """Next-token prediction taught by a frozen teacher's distributions (see the module)."""

    kind = "distill"

    @functools.cached_property
    def teacher_source(self) -> tuple[Path, int, ModelConfig]:
        """(workdir, newest step, model config) of `task.teacher`, checked to be a run."""
        where = self.config.task.teacher
        if not where:
            raise ValueError(
                "task.kind=distill needs task.teacher=RUN: a trained jaxlm run (or a model "
                "imported with jaxlm convert --from-hf) using this run's tokenizer"
            )
        workdir = Path(where)
        steps = checkpoint.complete_steps(workdir)
        if not steps:
            what = "holds no complete checkpoint" if workdir.is_dir() else "is not a directory"
            raise FileNotFoundError(
                f"task.teacher={where!r} {what}; give a trained run's --workdir or an imported "
                "model's"
            )
        return workdir, steps[-1], checkpoint.saved_config(workdir, steps[-1]).model

    @property
    def teacher_model(self) -> ModelConfig:
        return self.teacher_source[2]

    def check(self, tokenizer: Tokenizer) -> None:
        super().check(tokenizer)
        workdir, step, teacher = self.teacher_source
        student, flag = self.config.model, f"task.teacher={self.config.task.teacher!r}"
        if teacher.vocab_size != student.vocab_size:
            raise ValueError(
                f"{flag} has another vocabulary (vocab_size={teacher.vocab_size}, the student's "
                f"is {student.vocab_size}): distillation compares distributions over the same "
                "tokens; use a teacher with this run's tokenizer"
            )
        if teacher.head != "lm" or not teacher.causal:
            raise ValueError(
                f"{flag} is not a causal language model (model.head={teacher.head!r}, "
                f"causal={teacher.causal}); a teacher predicts the next token"
            )
        if teacher.max_seq_len < self.config.data.seq_len:
            raise ValueError(
                f"{flag} takes sequences of up to {teacher.max_seq_len} tokens; data.seq_len="
                f"{self.config.data.seq_len} is longer"
            )
        saved = checkpoint.checkpoint_dir(workdir) / str(step) / "tokenizer" / "metadata"
        if saved.is_file() and json.loads(saved.read_text()) != checkpoint.tokenizer_files(
            tokenizer
        ):
            raise ValueError(
                f"{flag} was trained with another tokenizer than data.tokenizer="
                f"{self.config.data.tokenizer!r}; distil with the teacher's tokenizer "
                f"(--set data.tokenizer={workdir / checkpoint.TOKENIZER_DIR})"
            )

    def frozen_inputs(self, plan: Any) -> dict[str, Any]:
        """The teacher's parameters, restored in the student's mesh and logical rules."""
        workdir, step, teacher = self.teacher_source
        shardings = param_shardings(teacher, plan.mesh, plan.rules)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype, sharding=s),
            abstract_params(teacher),
            shardings,
            is_leaf=lambda x: hasattr(x, "names"),
        )
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        try:
            return {TEACHER: ckpt.restore_params(step, abstract)}
        finally:
            ckpt.close()

    def loss_terms(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        if TEACHER not in params:
            raise ValueError("task.kind=distill trains through RunPlan.train_step (the teacher)")
        teacher = jax.lax.stop_gradient(params[TEACHER])
        student = {k: v for k, v in params.items() if k != TEACHER}
        task = self.config.task
        logits, aux = self.forward(student, batch, rng)
        teacher_logits, _, _ = Transformer(self.teacher_model).apply(
            {"params": teacher}, batch["tokens"], batch["positions"], batch["segment_ids"]
        )
        sums = losses.cross_entropy_sums(logits, batch["targets"], batch["mask"])
        kl = distill_kl_sums(logits, teacher_logits, batch["mask"], task.distill_temperature)
        hard = sums["nll"] + self.config.train.z_loss * sums["z"]
        a, t = task.distill_alpha, task.distill_temperature
        loss = a * t * t * kl + (1.0 - a) * hard
        return {"loss": loss, "kl": kl, **sums, **self.aux_terms(aux)}

    def metrics(
        self, terms: dict[str, jax.Array], batch: dict[str, jax.Array], total: jax.Array
    ) -> dict[str, jax.Array]:
        return {
            **super().metrics(terms, batch, total),
            "distill_kl": terms["kl"] / total,
            "distill_loss": terms["loss"] / total,
        }
