import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyro_bc
from pyro_bc.elbo import MeanFieldELBO
from pyro_bc.models import LeNet300100
from pyro_bc.nn import BayesianLinear, BayesianNetwork
from pyro_bc.poutine import local_reparameterization
from pyro_bc.priors import GroupHorseshoe, RegularizedHorseshoe


def half_cauchy_groups(name, num_groups):
    # HalfCauchy has no registered KL with a log-normal guide: a Monte Carlo site
    return pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize(
    "prior",
    [None, GroupHorseshoe(), RegularizedHorseshoe(), half_cauchy_groups],
    ids=lambda p: getattr(p, "__name__", repr(p)),
)
def test_same_loss_and_gradients_as_trace_mean_field(prior, validate):
    model = BayesianNetwork(
        [torch.nn.Flatten(), BayesianLinear(16, 8, prior=prior), BayesianLinear(8, 3, prior=prior)],
        dataset_size=100,
    )
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))

    def loss_and_grads(elbo):
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(validate), local_reparameterization():
            loss = elbo.differentiable_loss(model, guide, x, y)
        grads = torch.autograd.grad(loss, list(guide.parameters()))
        return loss, grads

    expected, expected_grads = loss_and_grads(TraceMeanField_ELBO())
    loss, grads = loss_and_grads(MeanFieldELBO())
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_particles_average():
    model = LeNet300100(dataset_size=100)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    pyro.set_rng_seed(2)
    with local_reparameterization():
        two = MeanFieldELBO(num_particles=2).differentiable_loss(model, guide, x, y)
    pyro.set_rng_seed(2)
    with local_reparameterization():
        single = [MeanFieldELBO().differentiable_loss(model, guide, x, y) for _ in range(2)]
    torch.testing.assert_close(two, sum(single) / 2)
