"""Typed, frozen configuration: the model architecture, the run, presets and overrides."""

from jaxlm.configs.model import ModelConfig
from jaxlm.configs.presets import PRESETS, get_preset
from jaxlm.configs.run import DataConfig, MeshConfig, RunConfig

__all__ = ["PRESETS", "DataConfig", "MeshConfig", "ModelConfig", "RunConfig", "get_preset"]
