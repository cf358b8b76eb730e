"""A thin Orbax `CheckpointManager` wrapper: what one checkpoint holds and how it is restored.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds five items, each readable alone:

- `params`: the model parameters (what sampling, evaluation and fine-tuning need);
- `train`: the rest of the `TrainState` (step, optimizer state, RNG, non-finite counters, the
  loss scaler when the run has one);
- `data`: the Grain iterator state (JSON), so resumed runs see the same batches in the same order;
- `config`: the full `RunConfig` (JSON);
- `tokenizer`: the tokenizer's files (JSON, base64), so a checkpoint copied alone still decodes.

Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp` and renames it only after every
file is written (`commit_success.txt` marks it complete), so a process killed mid-save leaves no
half-checkpoint that could be picked up; leftover temporary directories are removed on the next
start. Arrays are restored straight into the target shardings (any mesh), never through one host.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm import distributed, storage
from jaxlm.configs.overrides import from_dict, to_dict
from jaxlm.configs.run import CheckpointConfig, RunConfig
from jaxlm.files import read_json

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"
_PROBE = ".jaxlm-write-probe"


def _split(state: Any) -> tuple[Any, dict[str, Any]]:
    """(params, everything else) of a `TrainState`, saved as two items (fields that are None,
    such as the loss scaler of a run without one, are left out)."""
    rest = {k: v for k, v in vars(state).items() if k != "params" and v is not None}
    return state.params, rest


def checkpoint_dir(workdir: str | Path) -> storage.AnyPath:
    return storage.as_path(workdir, absolute=True) / CHECKPOINT_DIR


def complete_steps(workdir: str | Path) -> list[int]:
    """Steps with a committed checkpoint in `workdir`, oldest first (creates nothing)."""
    directory = checkpoint_dir(workdir)
    storage.refresh(directory)
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").is_file()
    )


def saved_config(workdir: str | Path, step: int) -> RunConfig:
    """The `RunConfig` stored in the checkpoint at `step` (read directly from its JSON item)."""
    path = checkpoint_dir(workdir) / str(step) / "config" / "metadata"
    return from_dict(RunConfig, read_json(path, what="a run config"))


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """{file name: base64 contents} of the files `tokenizer.save` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return {
            p.name: base64.b64encode(p.read_bytes()).decode("ascii")
            for p in sorted(Path(tmp).iterdir())
            if p.is_file()
        }


def write_tokenizer_files(files: dict[str, str], directory: str | Path) -> storage.AnyPath:
    directory = storage.as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / Path(name).name).write_bytes(base64.b64decode(data))
    return directory


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be restored (each one is damaged, or of another kind)."""


def brief(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (Orbax/TensorStore messages run to many lines)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:limit]}"


class Checkpointer:
    """Saves asynchronously every `config.every` steps (and when asked), keeping the last `keep`
    (plus every `keep_period`-th step forever when it is set)."""

    def __init__(
        self, workdir: str | Path, config: CheckpointConfig | None = None, read_only: bool = False
    ) -> None:
        config = config or CheckpointConfig()
        self.workdir = storage.as_path(workdir, absolute=True)
        self.directory = checkpoint_dir(workdir)
        storage.refresh(self.directory)  # a bucket listed earlier may have new checkpoints
        self._every = config.every
        self._kept = set(config.kept_steps)
        self._read_only = read_only
        retention: dict[str, Any] = {
            "max_to_keep": config.keep,
            "keep_period": config.keep_period or None,
        }
        if self._kept:  # the newest `keep`, every `keep_period`-th, and these, forever
            policies = ocp.checkpoint_managers
            keep = [policies.LatestN(n=config.keep), policies.CustomSteps(steps=sorted(self._kept))]
            if config.keep_period:
                keep.append(policies.EveryNSteps(interval_steps=config.keep_period))
            retention = {"preservation_policy": policies.AnyPreservationPolicy(keep)}
        options = ocp.CheckpointManagerOptions(
            **retention,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=config.async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self._every == 0 or step in self._kept

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any],
        config: RunConfig,
        tokenizer: dict[str, str],
    ) -> None:
        """Start writing the checkpoint of `step`; returns once the arrays are copied off device."""
        params, rest = _split(state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(rest),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(to_dict(config)),
                tokenizer=ocp.args.JsonSave(tokenizer),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The `TrainState` at `step`, placed on the shardings of `abstract_state`, and the data
        iterator state."""
        abstract_params, abstract_rest = _split(abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                train=ocp.args.StandardRestore(abstract_rest),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = abstract_state.replace(params=restored.params, **restored.train)
        return state, restored.data

    def restore_params(self, step: int, abstract_params: Any, partial: bool = False) -> Any:
        """Only the parameters at `step` (no optimizer state is read), on `abstract_params`'s
        shardings and dtypes; `partial`: `abstract_params` names only some of the saved ones."""
        if partial:
            args: Any = ocp.args.PyTreeRestore(
                item=abstract_params,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
                partial_restore=True,
            )
        else:
            args = ocp.args.StandardRestore(abstract_params)
        restored = self._manager.restore(step, args=ocp.args.Composite(params=args))
        return restored.params

    def restore_json(self, step: int, item: str) -> Any:
        """The JSON item `data`, `config` or `tokenizer` of the checkpoint at `step`."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        )
        return restored[item]

    def restore_latest(
        self, restore_fn: Callable[[int], Any], log: Callable[[str], None]
    ) -> tuple[int, Any] | None:
        """(step, restore_fn(step)) for the newest checkpoint that restores; None if there is none.

        Checkpoints newer than the one that restores (truncated or corrupted files) are moved to
        `<workdir>/corrupt_checkpoints/` (kept for inspection, out of the way of new saves), with
        a message; a read-only checkpointer leaves them in place and says which step it used. If
        none restores, nothing is moved and `CheckpointError` gives the newest one's error: that
        is a mismatch (e.g. another model or jaxlm version), not damage, and must not silently
        restart training.
        """
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = restore_fn(step)
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files
                failed.append((step, e))
                continue
            for bad, e in failed:
                if self._read_only:
                    log(
                        f"checkpoint at step {bad} cannot be restored ({brief(e)}); using step "
                        f"{step}"
                    )
                else:
                    log(
                        f"checkpoint at step {bad} cannot be restored ({brief(e)}); moved it to "
                        f"{QUARANTINE_DIR}/ and resumed from step {step}"
                    )
                    self.quarantine(bad)
            return step, restored
        if failed:
            step, e = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (steps "
                f"{[s for s, _ in failed]}); the newest, step {step}, fails with {brief(e, 500)}"
            ) from e
        return None

    def quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.workdir / QUARANTINE_DIR / str(step)
            storage.move_tree(self.directory / str(step), target)
        distributed.barrier(f"jaxlm_quarantine_{step}")  # moved before any process re-lists
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is committed (re-raising a failed save's error)."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.close()


def state_bytes(tree: Any) -> int:
    """Bytes the arrays (or `ShapeDtypeStruct`s) of `tree` take: one checkpoint's size."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def check_workdir(workdir: str | Path, needed_bytes: int) -> None:
    """Fail now, not mid-run, when `workdir` cannot be written or lacks `needed_bytes` free.

    Creates `workdir` if needed (and removes it again when the check fails and it was empty).
    A bucket is checked by writing and deleting a small object; it has no free space to check.
    """
    if storage.is_remote(workdir):
        probe = storage.as_path(workdir) / _PROBE
        try:
            probe.write_bytes(b"\0" * 4096)
            probe.unlink()
        except Exception as e:  # gcsfs raises OSError subclasses and HTTP errors
            raise ValueError(
                f"cannot write to workdir {str(workdir)!r}: {brief(e)} (check the bucket name "
                "and that application default credentials may write to it)"
            ) from None
        return
    workdir = Path(workdir)
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / _PROBE
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write to workdir {str(workdir)!r}: {e.strerror or e} "
            "(choose a writable --workdir)"
        ) from None
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
        if created and not any(workdir.iterdir()):
            workdir.rmdir()
        raise ValueError(
            f"workdir {str(workdir)!r} has {free / 2**20:,.1f} MiB free but the run's checkpoints "
            f"need about {needed_bytes / 2**20:,.1f} MiB; free some space, lower checkpoint.keep, "
            "or choose another --workdir"
        )


def save_run_files(workdir: str | Path, config: RunConfig, tokenizer: Any) -> None:
    """Write the run config (JSON) and tokenizer files next to the checkpoints (for people and
    tools; each checkpoint holds its own copy as well)."""
    workdir = storage.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # atomic: a kill never leaves half a config
    storage.write_text_atomic(workdir / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")
    if storage.is_remote(workdir):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            storage.upload_dir(Path(tmp), workdir / TOKENIZER_DIR)
    else:
        tokenizer.save(workdir / TOKENIZER_DIR)


# Fields that a resumed run must share with the saved one: the parameters' shapes, the optimizer
# state's structure and the data iterator's state depend on them. Everything else (steps, eval and
# log intervals, the mesh, microbatches, learning-rate values) may change between runs.
_RESUME_FIXED = (
    "model.",
    "task.",
    "optim.name",
    "data.dataset",
    "data.tokenizer",
    "data.seq_len",
    "data.add_bos",
    "data.add_eos",
    "data.text_key",
    "seed",
    "train.loss_scale",  # whether the train state holds a loss scaler
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ...but for these, which change how the model is computed, not what it computes.
_RESUME_FREE = (
    "model.context_attention",
    "model.context_load_balance",
    "model.pipeline_microbatches",
    "model.pipeline_repeats",
    "model.pipeline_gather_weights",
)


def resume_conflicts(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, new value)} for fields that may not change when resuming."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    return {
        k: (a[k], b.get(k))
        for k in a
        if a[k] != b.get(k)
        and k not in _RESUME_FREE
        and any(k == f or (f.endswith(".") and k.startswith(f)) for f in _RESUME_FIXED)
    }


def load_run_config(workdir: str | Path) -> RunConfig:
    """The config of the newest complete checkpoint in `workdir`, else its `config.json`."""
    steps = complete_steps(workdir)
    for step in reversed(steps):
        try:
            return saved_config(workdir, step)
        except (OSError, ValueError):  # a damaged checkpoint: try the next older one
            continue
    path = storage.as_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} is not a jaxlm run directory (no {CONFIG_FILE})")
    return from_dict(RunConfig, read_json(path, what="a run config"))
