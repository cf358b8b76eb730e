"""Tasks: the ways to train on the one run setup (`task.kind` in the run config)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxlm.configs.run import TASK_KINDS
from jaxlm.tasks.base import Task, merge, param_names, partition
from jaxlm.tasks.contrastive import ContrastiveTask
from jaxlm.tasks.distill import DistillTask
from jaxlm.tasks.dpo import DPOTask
from jaxlm.tasks.lm import LMTask
from jaxlm.tasks.mlm import MLMTask
from jaxlm.tasks.prefix_lm import PrefixLMTask
from jaxlm.tasks.reward import RewardTask
from jaxlm.tasks.rl import GRPOTask, PPOTask
from jaxlm.tasks.sft import SFTTask

if TYPE_CHECKING:
    from jaxlm.configs.run import RunConfig

TASKS: dict[str, type[Task]] = {
    LMTask.kind: LMTask,
    SFTTask.kind: SFTTask,
    MLMTask.kind: MLMTask,
    PrefixLMTask.kind: PrefixLMTask,
    ContrastiveTask.kind: ContrastiveTask,
    DPOTask.kind: DPOTask,
    RewardTask.kind: RewardTask,
    PPOTask.kind: PPOTask,
    GRPOTask.kind: GRPOTask,
    DistillTask.kind: DistillTask,
}


def get_task(config: RunConfig) -> Task:
    """The `Task` that `config.task.kind` names, bound to `config`."""
    kind = config.task.kind
    if kind not in TASKS:  # a kind the config accepts but this build has no class for
        raise ValueError(f"task.kind={kind!r} is not available; choose one of {sorted(TASKS)}")
    return TASKS[kind](config)


__all__ = [
    "TASKS",
    "TASK_KINDS",
    "ContrastiveTask",
    "DPOTask",
    "DistillTask",
    "GRPOTask",
    "LMTask",
    "MLMTask",
    "PPOTask",
    "PrefixLMTask",
    "RewardTask",
    "SFTTask",
    "Task",
    "get_task",
    "merge",
    "param_names",
    "partition",
]
