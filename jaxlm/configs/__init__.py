"""Typed, frozen configuration: the model architecture, the run, presets and overrides."""

from jaxlm.configs.model import LoRAConfig, ModelConfig, MoEConfig
from jaxlm.configs.presets import PRESETS, default_job, get_preset
from jaxlm.configs.quant import QuantConfig
from jaxlm.configs.run import (
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "LoRAConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "default_job",
    "get_preset",
]
