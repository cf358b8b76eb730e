"""A tiny random Llama shared by the serving tests (one compile of each program per module)."""

import dataclasses

import pytest

from jaxlm.configs import get_preset
from tests.random_params import random_params

CFG = dataclasses.replace(get_preset("tiny-llama"), max_seq_len=128)


@pytest.fixture(scope="session")
def params():
    return random_params(CFG, seed=3)
