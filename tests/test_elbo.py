import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyro_bc
from pyro_bc.elbo import (
    MeanFieldELBO,
    _is_label_per_row,
    _log_prob_sum,
    one_pass_negative_elbo,
    supports_one_pass,
)
from pyro_bc.models import LeNet300100
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork
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


def _conv_network(prior, batch_norm=False):
    return BayesianNetwork(
        [
            BayesianConv2d(1, 3, 3, prior=prior, bias=not batch_norm, batch_norm=batch_norm),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            BayesianLinear(12, 3, prior=prior),
        ],
        dataset_size=100,
    )


def _dense_network(prior):
    return BayesianNetwork(
        [torch.nn.Flatten(), BayesianLinear(16, 8, prior=prior), BayesianLinear(8, 3, prior=prior)],
        dataset_size=100,
    )


@pytest.mark.parametrize("network", [_dense_network, _conv_network])
@pytest.mark.parametrize(
    "prior",
    [None, GroupHorseshoe(), RegularizedHorseshoe(), half_cauchy_groups],
    ids=lambda p: getattr(p, "__name__", repr(p)),
)
def test_one_pass_gives_the_loss_and_gradients_of_trace_mean_field(network, prior):
    model = network(prior)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))
    params = list(guide.parameters())

    pyro.set_rng_seed(1)
    with local_reparameterization():
        expected = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    expected_grads = torch.autograd.grad(expected, params)
    pyro.set_rng_seed(1)
    with pyro.validation_enabled(False):
        loss, logits = one_pass_negative_elbo(model, guide.sample, x, y)
    grads = torch.autograd.grad(loss, params)

    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert logits.shape == (10, 3)


def test_one_pass_scores_auxiliary_guide_sites_and_batch_norm_parameters():
    model = _conv_network(GroupHorseshoe(), batch_norm=True)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))

    def guide_with_auxiliary(x, y):
        guide.sample(x, y)
        q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        pyro.sample("auxiliary", q, infer={"is_auxiliary": True})

    params = [*guide.parameters(), *model.parameters()]
    pyro.set_rng_seed(3)
    with local_reparameterization():
        expected = TraceMeanField_ELBO().differentiable_loss(model, guide_with_auxiliary, x, y)
    expected_grads = torch.autograd.grad(expected, params)
    pyro.set_rng_seed(3)
    with pyro.validation_enabled(False):
        loss, _ = one_pass_negative_elbo(model, guide_with_auxiliary, x, y)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_supports_one_pass_only_where_every_latent_model_site_is_guided():
    model = _dense_network(None)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    with local_reparameterization():
        model_trace, guide_trace = MeanFieldELBO()._get_trace(model, guide.sample, (x, y), {})
    assert supports_one_pass(model_trace, guide_trace)
    guide_trace.remove_node("1.weight")
    assert not supports_one_pass(model_trace, guide_trace)


def test_training_step_takes_the_one_pass_path_to_the_same_parameters():
    def train(one_pass):
        torch.manual_seed(0)
        model = LeNet300100(dataset_size=100)
        guide = pyro_bc.StructuredGuide(model, clip_var={"fc1": 0.04})
        step = pyro_bc.infer.TrainingStep(model, guide, lr=1e-2, one_pass=one_pass)
        pyro.set_rng_seed(5)
        for _ in range(4):
            x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
            loss, logits = step(x, y)
            assert logits.shape == (8, 10)
        return step.loss.one_pass, guide.state_dict()

    took_one_pass, one_pass_state = train(True)
    took_generic, generic_state = train(False)
    assert took_one_pass and not took_generic
    for name, value in generic_state.items():
        torch.testing.assert_close(one_pass_state[name], value, msg=name)


def test_labels_are_scored_as_categorical_log_prob_and_bad_labels_still_fail():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 2, 3, 0])
    fn = dist.Categorical(logits=logits)
    site = {"fn": fn, "value": labels, "args": (), "kwargs": {}, "scale": 2.5, "mask": None}
    assert not _is_label_per_row(fn, labels)  # validation on: Categorical checks the labels
    with pyro.validation_enabled(False):  # as on the training path
        assert _is_label_per_row(fn, labels)
        fast = _log_prob_sum(dict(site))
        expected = (fn.log_prob(labels) * 2.5).sum()
        for bad in (4, -100):  # out of range, and nll_loss's default ignore_index
            with pytest.raises(IndexError):
                _log_prob_sum({**site, "value": torch.tensor([0, 1, 2, 3, 0, bad])})
    assert torch.equal(fast, expected)
    assert torch.equal(
        torch.autograd.grad(fast, logits, retain_graph=True)[0],
        torch.autograd.grad(expected, logits)[0],
    )
