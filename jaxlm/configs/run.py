"""`RunConfig`: everything about a run that is not the model architecture."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from jaxlm.configs.model import ModelConfig, check_positive_ints

LossScale = Literal["auto", "dynamic", "none"]
MAX_LOSS_SCALE = 2.0**64  # dynamic loss scales never grow past this (float32 holds 2^127)

# Names of the rule sets in jaxlm.sharding.RULE_SETS (kept here so configs import nothing heavy).
RULE_SET_NAMES = ("dp", "fsdp", "fsdp_tp", "fsdp_ep", "fsdp_tp_ep")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN); -1 means "the rest"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1  # expert parallelism (MoE); data parallel for everything else
    # Context parallelism: the sequence split over this axis (`jaxlm.model.context`).
    context: int = 1
    # Pipeline parallelism: the scanned layers split into consecutive stages over this axis
    # (`jaxlm.model.pipeline`); usually across slices (`dcn_stage`).
    stage: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    dcn_context: int = 1
    dcn_stage: int = 1
    rules: str = "fsdp"

    def __post_init__(self) -> None:
        if self.rules not in RULE_SET_NAMES:
            raise ValueError(
                f"MeshConfig.rules={self.rules!r} is not a rule set; choose one of {RULE_SET_NAMES}"
            )
        for group in (
            ("stage", "data", "fsdp", "expert", "context", "tensor"),
            ("dcn_stage", "dcn_data", "dcn_fsdp", "dcn_expert", "dcn_context", "dcn_tensor"),
        ):
            values = [getattr(self, n) for n in group]
            for n, v in zip(group, values, strict=True):
                if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                    raise ValueError(f"MeshConfig.{n}={v!r} must be an integer >= 1, or -1")
            if values.count(-1) > 1:
                raise ValueError(f"MeshConfig: at most one of {group} may be -1, got {values}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized, and the shape of the batches.

    `dataset`: "stdlib" (this Python's standard library sources, the default corpus), "tfds:NAME"
    (e.g. "tfds:lm1b", "tfds:c4/en"), or local files/globs ("data/*.txt,extra.jsonl").
    `tokenizer`: "byte", or a directory/file that `jaxlm.data.load_tokenizer` reads.
    `batch_size` is global (all processes together); `seq_len` tokens per packed row.
    """

    dataset: str = "stdlib"
    data_dir: str | None = None
    manual_dir: str | None = None
    download: bool = True
    text_key: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 16
    shuffle: bool = True
    add_bos: bool = True
    add_eos: bool = True
    worker_count: int = 0
    # Independent record streams whose rows make up each global batch (None = one per process,
    # or the saved number when resuming). Fix it (e.g. to the largest process count you will
    # use) to get the same batches whatever the number of processes.
    streams: int | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, "seq_len", "batch_size")
        if self.seq_len < 2:
            raise ValueError(
                f"DataConfig.seq_len={self.seq_len} must be >= 2 (a row of one token has no "
                "next token to predict)"
            )
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            raise ValueError(f"DataConfig.worker_count={self.worker_count!r} must be >= 0")
        if self.streams is not None:
            check_positive_ints(self, "streams")
            if self.batch_size % self.streams:
                raise ValueError(
                    f"DataConfig.batch_size={self.batch_size} is not divisible by "
                    f"streams={self.streams}; use a divisor of the batch size"
                )


OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "wsd", "inverse_sqrt", "constant")
WSD_DECAYS = ("linear", "1-sqrt")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and clipping (see `jaxlm.optim`)."""

    name: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 50
    # The schedule's length; None = train.steps. Set it to stop early or extend a run without
    # changing the learning rate of the steps already taken.
    schedule_steps: int | None = None
    min_lr_ratio: float = 0.1
    # warmup-stable-decay: the last `decay_fraction` of training decays to the minimum,
    # "linear"ly or as "1-sqrt" (lr = min + (peak - min)(1 - sqrt(progress)), Hägele et al. 2024).
    decay_fraction: float = 0.2
    wsd_decay: str = "linear"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"OptimConfig.name={self.name!r} is not valid; choose one of {OPTIMIZERS}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"OptimConfig.schedule={self.schedule!r} is not valid; choose one of {SCHEDULES}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"OptimConfig.learning_rate={self.learning_rate!r} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(
                f"OptimConfig.schedule_steps={self.schedule_steps!r} must be >= 1 or None "
                "(None = train.steps)"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(
                f"OptimConfig.decay_fraction={self.decay_fraction!r} must be in (0, 1]"
            )
        if self.wsd_decay not in WSD_DECAYS:
            raise ValueError(
                f"OptimConfig.wsd_decay={self.wsd_decay!r} is not valid; choose one of {WSD_DECAYS}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r} must be >= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"OptimConfig.{name}={getattr(self, name)!r} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps={self.eps!r} must be > 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"OptimConfig.clip_norm={self.clip_norm!r} must be > 0 or None")


TASK_KINDS = (
    "lm",
    "sft",
    "dpo",
    "reward",
    "ppo",
    "grpo",
    "mlm",
    "prefix_lm",
    "contrastive",
    "distill",
)
POOLINGS = ("mean", "cls", "last")
DPO_LOSSES = ("sigmoid", "ipo")
CHAT_TEMPLATES = ("auto", "chatml", "llama3", "plain", "raw", "tokenizer")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the run trains for (`jaxlm.tasks`): the batch it reads, its loss, what trains.

    `kind`: "lm" = causal language-model pre-training on packed text; "sft" = supervised
    fine-tuning on chat records (`data.dataset`: JSONL files with `messages` or `prompt` +
    `completion`), rendered with `chat_template` ("auto" = the tokenizer's own template when it
    has one, else "plain" for the byte tokenizer and "chatml" for others), the loss on assistant
    tokens only unless `train_on_prompt`; "dpo" = Direct Preference Optimisation on preference
    pairs (JSONL `prompt`, `chosen`, `rejected`; see `jaxlm.data.preference`) against the model
    without its adapters, with `beta`, `dpo_loss` ("sigmoid" or "ipo") and `label_smoothing`;
    "reward" = a reward model (`model.head="score"`) on the same pairs, Bradley-Terry loss;
    "ppo" / "grpo" = online RL (`jaxlm.tasks.rl`) on prompts (JSONL `prompt` + any fields the
    reward reads): each step samples `group_size` replies of up to `max_new_tokens` per prompt
    with the compiled sampler at `temperature`, scores them with `reward` (a Python function,
    "file.py:name" or "module:name") or `reward_model` (a reward run's workdir), and takes
    `ppo_epochs` clipped (`clip_eps`) policy updates on them, with a KL penalty `kl_coef` to the
    model without its adapters; PPO adds a value head (`model.value_head`), GAE (`gamma`,
    `gae_lambda`), a clipped value loss (`vf_coef`, `value_clip`); GRPO uses group-relative
    advantages instead (no value model). The reference of dpo/ppo/grpo is the model without its
    adapters, or for a full fine-tune a frozen copy of `reference` (default `train.init_from`).
    "mlm" = masked-LM pre-training of a bidirectional model (`model.causal=False`) on packed
    text (`jaxlm.data.masking`): each non-special token is chosen with `mask_prob` (with
    `whole_word_masking`, each word), a chosen token becomes the mask token with
    `mask_token_frac`, a random token with `random_token_frac`, else stays; the loss is on the
    chosen tokens. "prefix_lm" = prefix LM (`model.prefix_lm=True`) on packed text: each
    sequence is split at a uniform random point, the prefix is read bidirectionally and the loss
    is on the rest. "contrastive" = sentence embeddings (`pooling` of the last hidden states)
    trained with in-batch-negative InfoNCE at `contrastive_temperature` on text pairs
    (`jaxlm.data.contrastive`: JSONL `anchor` / `positive`, or `text` with dropout views).
    """

    kind: str = "lm"
    chat_template: str = "auto"
    train_on_prompt: bool = False
    # dpo: the strength of the pull toward the reference, the loss, label smoothing (the
    # assumed chance that a pair's preference is flipped; sigmoid loss only).
    beta: float = 0.1
    dpo_loss: str = "sigmoid"
    label_smoothing: float = 0.0
    # ppo / grpo: the reward, the rollouts, the updates.
    reward: str = ""
    reward_model: str = ""
    # dpo / ppo / grpo: a run whose newest checkpoint is the frozen reference (default for a
    # full fine-tune: train.init_from; with adapters: the model without them).
    reference: str = ""
    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    kl_coef: float = 0.05
    clip_eps: float = 0.2
    ppo_epochs: int = 2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2
    # mlm: the masking (BERT's 15% and 80/10/10 by default).
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    whole_word_masking: bool = False
    # At most this many chosen tokens per row (BERT's max_predictions_per_seq, e.g. 20 of 128),
    # and the vocabulary head runs on those positions only; None = no cap, head everywhere.
    max_predictions: int | None = None
    # contrastive: how a sequence's hidden states become its embedding ("mean" over its
    # tokens, "cls" = its first token's, "last" = its last token's) and the InfoNCE temperature.
    pooling: str = "mean"
    contrastive_temperature: float = 0.05
    # distill: the frozen teacher (a run's workdir, same tokenizer), the weight of its soft
    # targets against the data's next tokens, and the softmax temperature of both.
    teacher: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_positive_ints(self, "group_size", "max_new_tokens", "ppo_epochs")
        for name, low, high in (
            ("temperature", 0.0, float("inf")),
            ("clip_eps", 0.0, 1.0),
            ("value_clip", 0.0, float("inf")),
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low < value < high):
                raise ValueError(f"TaskConfig.{name}={value!r} must be in ({low:g}, {high:g})")
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TaskConfig.{name}={value!r} must be in [0, 1]")
        for name in ("kl_coef", "vf_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
                raise ValueError(f"TaskConfig.{name}={value!r} must be a finite number >= 0")
        alpha, temp = self.distill_alpha, self.distill_temperature
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"TaskConfig.distill_alpha={alpha!r} must be in [0, 1]")
        if not (isinstance(temp, (int, float)) and 0.0 < temp < float("inf")):
            raise ValueError(f"TaskConfig.distill_temperature={temp!r} must be a finite number > 0")
        if self.pooling not in POOLINGS:
            raise ValueError(f"TaskConfig.pooling={self.pooling!r} must be one of {POOLINGS}")
        temp = self.contrastive_temperature
        if not (isinstance(temp, (int, float)) and 0.0 < temp < float("inf")):
            raise ValueError(
                f"TaskConfig.contrastive_temperature={temp!r} must be a finite number > 0"
            )
        if self.max_predictions is not None and not (
            isinstance(self.max_predictions, int) and self.max_predictions >= 1
        ):
            raise ValueError(
                f"TaskConfig.max_predictions={self.max_predictions!r} must be an integer >= 1 "
                "(or None: no cap)"
            )
        if not (isinstance(self.mask_prob, (int, float)) and 0.0 < self.mask_prob < 1.0):
            raise ValueError(f"TaskConfig.mask_prob={self.mask_prob!r} must be in (0, 1)")
        for name in ("mask_token_frac", "random_token_frac"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TaskConfig.{name}={value!r} must be in [0, 1]")
        if self.mask_token_frac + self.random_token_frac > 1.0 + 1e-9:
            raise ValueError(
                f"TaskConfig.mask_token_frac={self.mask_token_frac} + random_token_frac="
                f"{self.random_token_frac} must be <= 1 (the rest of the chosen tokens stay)"
            )
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"TaskConfig.kind={self.kind!r} is not a task; choose one of {TASK_KINDS}"
            )
        if not self.beta > 0:
            raise ValueError(f"TaskConfig.beta={self.beta!r} must be > 0")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(
                f"TaskConfig.dpo_loss={self.dpo_loss!r} is not a loss; choose one of {DPO_LOSSES}"
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"TaskConfig.label_smoothing={self.label_smoothing!r} must be in [0, 0.5)"
            )
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(
                f"TaskConfig.chat_template={self.chat_template!r} is not a template; choose one "
                f"of {CHAT_TEMPLATES}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batching into microbatches, losses, evaluation, logging."""

    steps: int = 400
    microbatches: int = 1
    z_loss: float = 0.0
    eval_every: int = 200
    eval_batches: int = 8
    # lm-evaluation-harness tasks (comma-separated names or local YAML files; needs
    # jaxlm[eval]) run every `eval_every` steps beside the loss: at most `eval_tasks_limit`
    # documents per task (0 = all), `eval_tasks_fewshot` examples (None = the task's).
    eval_tasks: str = ""
    eval_tasks_limit: int = 0
    eval_tasks_fewshot: int | None = None
    log_every: int = 10
    # Per-device peak FLOP/s for MFU; None picks a known value for the accelerator (measured
    # matmul rate on CPU).
    peak_flops_per_device: float | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 64
    # The closing sample: temperature then nucleus (top-p) sampling with `seed`; 0 = greedy.
    sample_temperature: float = 0.8
    sample_top_p: float = 0.95
    # A step whose loss or gradients are not finite is skipped (state unchanged
    # but for the step counter); this many in a row stop the run with an error.
    max_nonfinite_steps: int = 10
    # Dynamic loss scaling (for float16 compute): the loss is multiplied by a scale before the
    # backward pass and the gradients divided by it, so small float16 gradients do not flush to
    # zero. A step whose gradients overflow is skipped and the scale halves (down to 1); after
    # `loss_scale_period` finite steps in a row it doubles. "auto" = on when model.dtype or
    # model.param_dtype is float16; "dynamic" = on; "none" = off. The scale is in the train
    # state (checkpointed); skipped overflows do not count towards `max_nonfinite_steps`.
    loss_scale: LossScale = "auto"
    loss_scale_init: float = 2.0**15
    loss_scale_period: int = 2000
    # Start a new run from the parameters of another run (or an imported model) in this workdir,
    # with a fresh optimizer and schedule; `init_from_step` picks its checkpoint (None = newest).
    # Once this run has a checkpoint of its own it resumes from that and ignores both.
    init_from: str | None = None
    init_from_step: int | None = None
    # Continue another run's checkpoint in full (parameters, optimizer state, step, RNG and data
    # position) under this config's schedule and `steps`: e.g. a cooldown branched from a
    # constant-learning-rate run. The fields a resume may not change must match that run's.
    # `branch_from_step` picks its checkpoint (None = newest). Once this run has a checkpoint
    # of its own it resumes from that instead.
    branch_from: str | None = None
    branch_from_step: int | None = None

    def __post_init__(self) -> None:
        check_positive_ints(
            self,
            "steps",
            "microbatches",
            "eval_every",
            "log_every",
            "max_nonfinite_steps",
            "loss_scale_period",
        )
        if self.loss_scale not in get_args(LossScale):
            raise ValueError(
                f"TrainConfig.loss_scale={self.loss_scale!r} is not valid; choose one of "
                f"{list(get_args(LossScale))}"
            )
        init = self.loss_scale_init
        if not (math.isfinite(init) and 1 <= init <= MAX_LOSS_SCALE):
            raise ValueError(
                f"TrainConfig.loss_scale_init={self.loss_scale_init!r} must be in [1, 2**64] "
                "(a power of two keeps the unscaled gradients exact)"
            )
        if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
            raise ValueError(
                f"TrainConfig.peak_flops_per_device={self.peak_flops_per_device!r} must be > 0 "
                "or None (None = the accelerator's known peak, or a measured rate on CPU)"
            )
        if self.init_from_step is not None and self.init_from_step < 0:
            raise ValueError(f"TrainConfig.init_from_step={self.init_from_step!r} must be >= 0")
        for name in ("init_from", "branch_from"):
            if getattr(self, name) == "":
                raise ValueError(f"TrainConfig.{name}='' must be a run directory or None")
        if self.branch_from_step is not None and self.branch_from_step < 1:
            raise ValueError(
                f"TrainConfig.branch_from_step={self.branch_from_step!r} must be >= 1 or None"
            )
        if self.branch_from is not None and self.init_from is not None:
            raise ValueError(
                "TrainConfig.branch_from and init_from are both set: a run either continues "
                "another run's whole state (branch_from) or starts from its parameters (init_from)"
            )
        if self.eval_tasks_limit < 0:
            raise ValueError(
                f"TrainConfig.eval_tasks_limit={self.eval_tasks_limit!r} must be >= 0 "
                "(documents per task; 0 = all)"
            )
        if self.eval_tasks_fewshot is not None and self.eval_tasks_fewshot < 0:
            raise ValueError(
                f"TrainConfig.eval_tasks_fewshot={self.eval_tasks_fewshot!r} must be >= 0 or None"
            )
        if self.eval_batches < 0 or self.sample_tokens < 0:
            raise ValueError("TrainConfig.eval_batches and sample_tokens must be >= 0")
        if self.z_loss < 0:
            raise ValueError(f"TrainConfig.z_loss={self.z_loss!r} must be >= 0")
        if not self.sample_temperature >= 0:
            raise ValueError(
                f"TrainConfig.sample_temperature={self.sample_temperature!r} must be >= 0 "
                "(0 = greedy)"
            )
        if not 0 < self.sample_top_p <= 1:
            raise ValueError(f"TrainConfig.sample_top_p={self.sample_top_p!r} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and how many checkpoints to keep."""

    every: int = 200
    keep: int = 2  # the newest `keep` checkpoints are kept...
    keep_period: int = 0  # ...plus, when > 0, every step divisible by it, forever
    # ...plus these steps (comma-separated), saved and kept forever: e.g. the points a cooldown
    # study branches from (`jaxlm.scaling.cooldown_grid`).
    keep_steps: str = ""
    async_save: bool = True  # write in a background thread while training goes on

    def __post_init__(self) -> None:
        check_positive_ints(self, "every", "keep")
        if self.keep_period < 0:
            raise ValueError(
                f"CheckpointConfig.keep_period={self.keep_period!r} must be >= 0 (0 = off)"
            )
        self.kept_steps  # noqa: B018 (parsed here so that a bad list fails at once)

    @property
    def kept_steps(self) -> tuple[int, ...]:
        """`keep_steps` as sorted integers."""
        steps = []
        for part in self.keep_steps.split(","):
            if not part.strip():
                continue
            try:
                step = int(part)
            except ValueError:
                step = -1
            if step < 1:
                raise ValueError(
                    f"CheckpointConfig.keep_steps={self.keep_steps!r}: {part.strip()!r} is not a "
                    "step >= 1 (comma-separated steps, e.g. '100,200')"
                )
            steps.append(step)
        return tuple(sorted(set(steps)))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: model, task, data, optimizer, training loop, checkpoints, mesh and seed."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
