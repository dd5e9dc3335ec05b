import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clean():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    # one thread: tests are small ops, and oversubscribed cores make OpenMP spin
    torch.set_num_threads(1)
    yield
