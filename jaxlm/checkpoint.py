"""A thin Orbax `CheckpointManager` wrapper: train state + data-iterator state + run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxlm.configs.overrides import from_dict, to_dict
from jaxlm.configs.run import CheckpointConfig, RunConfig

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


class Checkpointer:
    """Saves asynchronously every `config.every` steps (and when asked), keeping the last `keep`."""

    def __init__(self, workdir: str | Path, config: CheckpointConfig | None = None) -> None:
        config = config or CheckpointConfig()
        self.directory = Path(workdir).absolute() / "checkpoints"
        self._every = config.every
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self._every == 0

    def save(self, step: int, state: Any, data_state: dict[str, Any], config: RunConfig) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(to_dict(config)),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, placed on the shardings of `abstract_state`, and the data state."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def save_run_files(workdir: str | Path, config: RunConfig, tokenizer: Any) -> None:
    """Write the run config (JSON) and tokenizer files next to the checkpoints."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2) + "\n")
    tokenizer.save(workdir / TOKENIZER_DIR)


# Fields that a resumed run must share with the saved one: the parameters' shapes, the optimizer
# state's structure and the data iterator's state depend on them. Everything else (steps, eval and
# log intervals, the mesh, microbatches, learning-rate values) may change between runs.
_RESUME_FIXED = (
    "model.",
    "optim.name",
    "data.dataset",
    "data.tokenizer",
    "data.seq_len",
    "data.add_bos",
    "data.add_eos",
    "data.text_key",
    "seed",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_conflicts(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, new value)} for fields that may not change when resuming."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    return {
        k: (a[k], b.get(k))
        for k in a
        if a[k] != b.get(k)
        and any(k == f or (f.endswith(".") and k.startswith(f)) for f in _RESUME_FIXED)
    }


def load_run_config(workdir: str | Path) -> RunConfig:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} is not a jaxlm run directory (no {CONFIG_FILE})")
    return from_dict(RunConfig, json.loads(path.read_text()))
