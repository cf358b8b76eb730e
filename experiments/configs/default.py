"""The default `jaxlm train` job, spelled out: the "small" model on the stdlib corpus."""

from jaxlm.configs import RunConfig, get_preset


def get_config() -> RunConfig:
    return RunConfig(model=get_preset("small"))
