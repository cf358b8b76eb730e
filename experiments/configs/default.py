"""The default `jaxlm train` job, spelled out: the "small" model on the stdlib corpus."""

from jaxlm.configs import RunConfig, default_job


def get_config() -> RunConfig:
    return default_job()
