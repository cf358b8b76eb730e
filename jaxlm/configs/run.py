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
class RunConfig:
    """A whole run: the model, the device mesh, and the seed."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
