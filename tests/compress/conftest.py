"""A trained run shared by the compression tests (trained once per test process)."""

import pytest

from jaxlm import loop
from jaxlm.configs.overrides import load_config

SETS = [
    "model.d_model=64",
    "model.mlp_dim=256",
    "data.seq_len=64",
    "data.batch_size=8",
    "train.steps=150",
    "train.eval_every=150",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "train.log_every=50",
    "checkpoint.every=150",
    "checkpoint.async_save=false",
    "optim.learning_rate=3e-3",
    "optim.warmup_steps=10",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, _session_cache):
    """tiny-llama trained for 150 steps on the standard-library corpus."""
    workdir = tmp_path_factory.mktemp("quant") / "float"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLM_CACHE", str(_session_cache))
        loop.train(load_config("tiny-llama", SETS), workdir)
    return workdir
