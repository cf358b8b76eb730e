"""jaxlm: JAX/TPU-first language models. This module re-exports the public API."""

from jaxlm.configs import PRESETS, MeshConfig, ModelConfig, RunConfig, get_preset
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.metrics import flops_per_token, param_count, training_state_bytes
from jaxlm.model.transformer import Transformer, abstract_params, init_params, param_shardings
from jaxlm.sharding import make_mesh, use_mesh

__all__ = [
    "PRESETS",
    "MeshConfig",
    "ModelConfig",
    "RunConfig",
    "Transformer",
    "abstract_params",
    "apply_overrides",
    "flops_per_token",
    "get_preset",
    "init_params",
    "load_config",
    "make_mesh",
    "param_count",
    "param_shardings",
    "training_state_bytes",
    "use_mesh",
]
