"""jaxlm: JAX/TPU-first language models. This module re-exports the public API."""

from jaxlm.checkpoint import Checkpointer, load_run_config
from jaxlm.configs import PRESETS, LoRAConfig, MeshConfig, ModelConfig, RunConfig, get_preset
from jaxlm.configs.overrides import apply_overrides, load_config
from jaxlm.interop.hf import export_checkpoint as export_hf
from jaxlm.interop.hf import import_checkpoint as import_hf
from jaxlm.interop.peft import export_lora
from jaxlm.loop import eval_workdir, evaluate, train
from jaxlm.metrics import flops_per_token, param_count, training_state_bytes
from jaxlm.model.lora import merge_lora
from jaxlm.model.transformer import Transformer, abstract_params, init_params, param_shardings
from jaxlm.run import (
    RunPlan,
    abstract_train_state,
    init_train_state,
    load_for_eval,
    make_eval_step,
    make_train_step,
)
from jaxlm.sample import (
    Greedy,
    MinP,
    Temperature,
    TopK,
    TopP,
    generate,
    generate_stream,
    strategies,
)
from jaxlm.sharding import make_mesh, use_mesh
from jaxlm.step import TrainState, train_step
from jaxlm.tasks import Task, get_task
from jaxlm.tasks.reward import score_chats
from jaxlm.tasks.sft import generate_replies

__all__ = [
    "PRESETS",
    "Checkpointer",
    "Greedy",
    "LoRAConfig",
    "MeshConfig",
    "MinP",
    "ModelConfig",
    "RunConfig",
    "RunPlan",
    "Task",
    "Temperature",
    "TopK",
    "TopP",
    "TrainState",
    "Transformer",
    "abstract_params",
    "abstract_train_state",
    "apply_overrides",
    "eval_workdir",
    "evaluate",
    "export_hf",
    "export_lora",
    "flops_per_token",
    "generate",
    "generate_replies",
    "generate_stream",
    "get_preset",
    "get_task",
    "import_hf",
    "init_params",
    "init_train_state",
    "load_config",
    "load_for_eval",
    "load_run_config",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "merge_lora",
    "param_count",
    "param_shardings",
    "score_chats",
    "strategies",
    "train",
    "train_step",
    "training_state_bytes",
    "use_mesh",
]
