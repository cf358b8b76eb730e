"""`RunConfig`: everything about a run that is not the model architecture."""

from __future__ import annotations

import dataclasses

from jaxlm.configs.model import ModelConfig

# Names of the rule sets in jaxlm.sharding.RULE_SETS (kept here so configs import nothing heavy).
RULE_SET_NAMES = ("dp", "fsdp", "fsdp_tp")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) and across slices (DCN); -1 means "the rest"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: str = "fsdp"

    def __post_init__(self) -> None:
        if self.rules not in RULE_SET_NAMES:
            raise ValueError(
                f"MeshConfig.rules={self.rules!r} is not a rule set; choose one of {RULE_SET_NAMES}"
            )
        for group in (("data", "fsdp", "tensor"), ("dcn_data", "dcn_fsdp", "dcn_tensor")):
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

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataConfig.{name}={value!r} must be an integer >= 1")
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            raise ValueError(f"DataConfig.worker_count={self.worker_count!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the model, the data, the device mesh, and the seed."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
