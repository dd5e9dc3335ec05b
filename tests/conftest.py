import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    torch.set_num_threads(2)
    yield
