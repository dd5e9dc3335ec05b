"""Everything runs where the guide's parameters are; checked on ``meta`` tensors, which refuse to
mix with CPU tensors as CUDA tensors do (and cost no memory)."""

from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.elbo import MeanFieldELBO
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork
from pyro_bc.poutine import local_reparameterization
from pyro_bc.priors import (
    GroupHorseshoe,
    GroupNormalJeffreys,
    RegularizedHorseshoe,
    as_prior,
    draw_group_scale,
)

META = torch.device("meta")


def half_cauchy_groups(name, num_groups):
    # the README's prior: constants built with no device
    tau = pyro.sample(f"{name}.tau", dist.HalfCauchy(torch.tensor(1.0)))
    lam = pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))
    return tau * lam


PRIORS = {
    "gnj": GroupNormalJeffreys(),
    "horseshoe": GroupHorseshoe(tau0=1e-3),
    "regularized": RegularizedHorseshoe(),
    "readme": half_cauchy_groups,
}


def _model(prior):
    layers = OrderedDict(
        conv=BayesianConv2d(1, 4, 3, prior=prior),
        relu=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=BayesianLinear(4 * 6 * 6, 10, prior=prior),
    )
    return BayesianNetwork(layers, dataset_size=100)


@pytest.fixture(autouse=True)
def _no_validation():
    # validating a distribution's arguments reads their values, which meta tensors do not have
    with pyro.validation_enabled(False):
        yield


@pytest.mark.parametrize("prior", PRIORS.values(), ids=PRIORS.keys())
def test_model_guide_and_loss_run_on_the_meta_device(prior):
    model = _model(prior).to(META)
    guide = pyro_bc.StructuredGuide(model)
    assert {p.device for p in guide.parameters()} == {META}
    x = torch.empty(8, 1, 8, 8, device=META)
    y = torch.zeros(8, dtype=torch.long, device=META)
    elbo = MeanFieldELBO()
    with local_reparameterization():
        model_trace, guide_trace = elbo._get_trace(model, guide.sample, (x, y), {})
        loss = elbo._negative_elbo(model_trace, guide_trace)
    assert loss.device == META and loss.shape == ()
    loss.backward()
    assert all(p.grad.device == META and p.grad.shape == p.shape for p in guide.parameters())
    assert pyro_bc.predict_logits(model, guide, x).shape == (8, 10)

    posteriors = guide.distributions()
    z = draw_group_scale(as_prior(prior), "fc", 144, posteriors, 5)
    assert z.device == META and z.shape == (5, 144)
    mean, var = as_prior(prior).scale_moments("conv", 4, posteriors)
    assert mean.device == META and mean.shape == var.shape == (4,)


def test_a_guide_built_on_cpu_moved_to_meta_runs_there():
    model = _model(half_cauchy_groups)
    guide = pyro_bc.StructuredGuide(model)
    model.to(META)
    guide.to(META)
    x = torch.empty(3, 1, 8, 8, device=META)
    y = torch.zeros(3, dtype=torch.long, device=META)
    elbo = MeanFieldELBO()
    with local_reparameterization():
        model_trace, guide_trace = elbo._get_trace(model, guide.sample, (x, y), {})
        # the README prior's sites have no closed-form KL: their log-densities run on meta
        loss = elbo._negative_elbo(model_trace, guide_trace)
    assert loss.device == META
    assert model_trace.nodes["_RETURN"]["value"].shape == (3, 10)


def test_cpu_batches_are_moved_to_the_parameters_device():
    model = _model(GroupNormalJeffreys()).to(META)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    assert pyro_bc.predict_logits(model, guide, x).device == META
    network = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(META)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    pyro_bc.infer.pretrain(network, loader, epochs=1, progress=False)
    assert network[1].weight.device == META
