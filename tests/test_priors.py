import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

import pyro_bc
from pyro_bc.distributions import unwrap
from pyro_bc.models import LeNet5Caffe
from pyro_bc.nn import BayesianLinear
from pyro_bc.poutine import local_reparameterization
from pyro_bc.priors import (
    GroupHorseshoe,
    GroupNormalJeffreys,
    RegularizedHorseshoe,
    draw_group_scale,
)

BUILT_IN = [GroupNormalJeffreys(), GroupHorseshoe(), RegularizedHorseshoe()]


def test_half_cauchy_decomposition_matches_half_cauchy():
    # s^2 = s_a s_b with s_a ~ Gamma(1/2, rate 1/tau0^2), s_b ~ InvGamma(1/2, 1): s ~ C+(0, tau0)
    tau0 = 1e-5
    n = 400_000
    s_a = dist.Gamma(0.5, tau0**-2).sample((n,)).double()
    s_b = dist.InverseGamma(0.5, 1.0).sample((n,)).double()
    s = (s_a * s_b).sqrt() / tau0
    quartiles = torch.quantile(s[:100_000], torch.tensor([0.25, 0.5, 0.75], dtype=s.dtype))
    # C+(0, 1) has quartiles tan(pi/8), 1, tan(3 pi/8)
    expected = torch.tensor([math.tan(math.pi / 8), 1.0, math.tan(3 * math.pi / 8)])
    torch.testing.assert_close(quartiles.float(), expected, rtol=0.03, atol=0)


def _guide_with_spread(model):
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            for factor in layer.scale_factors:
                factor.log_var.uniform_(-3, -1)
                factor.loc.add_(0.3 * torch.randn_like(factor.loc))
    return guide


def test_horseshoe_scale_moments_match_monte_carlo():
    prior = GroupHorseshoe(tau0=1e-3)
    layer = BayesianLinear(6, 2, prior=prior)
    guide = _guide_with_spread(layer)
    posteriors = guide.distributions()
    mean, var = prior.scale_moments(layer.site(), 6, posteriors)
    draws = draw_group_scale(prior, layer.site(), 6, posteriors, 400_000).detach().double()
    torch.testing.assert_close(draws.mean(0).float(), mean.detach(), rtol=0.01, atol=0)
    torch.testing.assert_close(draws.var(0).float(), var.detach(), rtol=0.05, atol=0)


@pytest.mark.parametrize("prior", BUILT_IN, ids=repr)
def test_built_in_priors_use_closed_form_kls_and_model_order(prior):
    model = LeNet5Caffe(prior=prior, dataset_size=100)
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    audit = pyro_bc.kl_audit(model, guide, x, y)
    assert not audit.monte_carlo_sites
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TraceMeanField_ELBO warns when the orders differ
        with pyro.validation_enabled(True), local_reparameterization():
            loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    assert torch.isfinite(loss)
    guide_sites = list(guide.distributions())
    trace = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x)))
    model_sites = [
        n
        for n, s in trace.get_trace(x, y).nodes.items()
        if s["type"] == "sample" and n in guide_sites
    ]
    assert model_sites == guide_sites


@pytest.mark.parametrize("prior", BUILT_IN, ids=repr)
def test_initial_group_scales_are_near_one(prior):
    layer = BayesianLinear(5, 2, prior=prior)
    guide = pyro_bc.StructuredGuide(layer)
    mean, _ = prior.scale_moments(layer.site(), 5, guide.distributions())
    assert ((mean - 1).abs() < 0.15).all()


def hand_written_horseshoe(name, num_groups, tau0=1e-5):
    s_a = pyro.sample(f"{name}.global_a", dist.Gamma(torch.tensor(0.5), torch.tensor(tau0**-2)))
    s_b = pyro.sample(f"{name}.global_b", dist.InverseGamma(torch.tensor(0.5), torch.tensor(1.0)))
    half = torch.full((num_groups,), 0.5)
    a = pyro.sample(f"{name}.local_a", dist.Gamma(half, 1.0).to_event(1))
    b = pyro.sample(f"{name}.local_b", dist.InverseGamma(half, 1.0).to_event(1))
    return (s_a * s_b * a * b).sqrt()


def _small_network(prior):
    return pyro_bc.nn.BayesianNetwork(
        [
            torch.nn.Flatten(),
            BayesianLinear(16, 8, prior=prior),
            torch.nn.ReLU(),
            BayesianLinear(8, 3, prior=prior),
        ],
        dataset_size=1000,
    )


def test_hand_written_horseshoe_equals_the_built_in_one():
    built_in = _small_network(GroupHorseshoe())
    custom = _small_network(hand_written_horseshoe)
    guide = _guide_with_spread(built_in)
    custom_guide = pyro_bc.StructuredGuide(custom)
    custom_guide.load_state_dict(guide.state_dict())
    assert list(custom_guide.distributions()) == list(guide.distributions())
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))

    def losses(model, guide_, n=400):
        elbo = TraceMeanField_ELBO()
        with torch.no_grad(), local_reparameterization():
            return torch.stack([elbo.differentiable_loss(model, guide_, x, y) for _ in range(n)])

    a, b = losses(built_in, guide), losses(custom, custom_guide)
    standard_error = ((a.var() + b.var()) / len(a)).sqrt()
    assert (a.mean() - b.mean()).abs() < 4 * standard_error
    # the KL part is closed form and therefore identical
    kl = [
        pyro_bc.kl_audit(pyro.poutine.block(m, hide=["obs"]), g, x)
        for m, g in ((built_in, guide), (custom, custom_guide))
    ]
    assert [r.kl for r in kl[0]] == pytest.approx([r.kl for r in kl[1]], rel=1e-6)


def test_regularized_horseshoe_caps_the_scale_at_the_slab():
    prior = RegularizedHorseshoe(tau0=1e-5, slab_scale=2.0)
    layer = BayesianLinear(4, 2, prior=prior)
    guide = pyro_bc.StructuredGuide(layer)
    global_a, global_b, local_a, local_b, slab = guide.layers[0].scale_factors
    with torch.no_grad():
        local_b.loc.fill_(20.0)  # a horseshoe scale far beyond the slab
        slab.log_var.fill_(-30.0)  # the slab width is c = 2 with certainty
    draws = draw_group_scale(prior, layer.site(), 4, guide.distributions(), 1000)
    assert draws.max() <= 2.0 + 1e-4
    assert draws.mean().item() == pytest.approx(2.0, rel=1e-3)
    # far below the slab the scale is the horseshoe's
    with torch.no_grad():
        local_b.loc.fill_(-4.0)
    mean, _ = prior.scale_moments(layer.site(), 4, guide.distributions())
    horseshoe_mean, _ = GroupHorseshoe.scale_moments(prior, layer.site(), 4, guide.distributions())
    torch.testing.assert_close(mean, horseshoe_mean, rtol=0.02, atol=0)


def test_unregistered_custom_prior_trains_with_monte_carlo_kl():
    def half_cauchy_groups(name, num_groups):
        tau = pyro.sample(f"{name}.tau", dist.HalfCauchy(torch.tensor(1.0)))
        lam = pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))
        return tau * lam

    model = pyro_bc.nn.BayesianNetwork(
        [torch.nn.Flatten(), BayesianLinear(16, 3, prior=half_cauchy_groups)], dataset_size=64
    )
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    audit = pyro_bc.kl_audit(model, guide, x, y)
    assert set(audit.monte_carlo_sites) == {"1.tau", "1.lam"}
    loader = [(x, y)] * 20
    history = pyro_bc.fit(model, guide, loader, epochs=2, lr=1e-2, progress=False)
    assert all(math.isfinite(v) for v in history["loss"])


def _moments(draws):
    """Means and variances of the groups, the covariance of groups 0 and 1, and their standard
    errors, from draws of shape (n, groups)."""
    draws = draws.detach().double()
    n = draws.shape[0]
    centred = draws - draws.mean(0)
    squares = centred.pow(2)
    product = centred[:, 0] * centred[:, 1]
    values = (draws.mean(0), squares.mean(0), product.mean())
    errors = ((squares.mean(0) / n).sqrt(), (squares.var(0) / n).sqrt(), (product.var() / n).sqrt())
    return values, errors


def _horseshoe_closed_form(prior, name, posteriors):
    """Mean and variance of each group's scale and the covariance of groups 0 and 1: log z is
    Normal, and groups share the global factors' half of it."""
    mean, var = (m.double() for m in prior.scale_moments(name, 6, posteriors))
    global_var = sum(unwrap(posteriors[f"{name}.{p}"]).scale ** 2 for p in ("global_a", "global_b"))
    covariance = mean[0] * mean[1] * torch.expm1(global_var.double() / 4)
    return mean, var, covariance


@pytest.mark.parametrize("prior", BUILT_IN, ids=repr)
def test_fast_scale_draws_have_the_model_s_distribution(prior):
    # draw_scale skips rerunning the prior's model: by Monte Carlo its draws must have the same
    # means, variances and covariance between groups (the horseshoe's global factors are shared)
    # as the generic path's, and as the closed forms where there are some.
    layer = BayesianLinear(6, 2, prior=prior)
    guide = _guide_with_spread(layer)
    posteriors = guide.distributions()
    name, n = layer.site(), 200_000
    with torch.no_grad():
        fast, fast_se = _moments(prior.draw_scale(name, 6, posteriors, n))
        generic, generic_se = _moments(draw_group_scale(prior, name, 6, posteriors, n))
    for a, b, se_a, se_b in zip(fast, generic, fast_se, generic_se, strict=True):
        assert ((a - b).abs() <= 5 * (se_a**2 + se_b**2).sqrt()).all()
    if isinstance(prior, RegularizedHorseshoe):
        return  # no closed form
    if isinstance(prior, GroupHorseshoe):
        expected = _horseshoe_closed_form(prior, name, posteriors)
    else:
        q = unwrap(posteriors[f"{name}.scale"])
        expected = (q.loc.double(), q.variance.double(), torch.tensor(0.0, dtype=torch.double))
    for value, se, exact in zip(fast, fast_se, expected, strict=True):
        assert ((value - exact.detach()).abs() <= 5 * se).all()


def test_fast_normal_jeffreys_draws_are_the_generic_draws():
    # one site, drawn the same way: the same random numbers give the same scales
    prior = GroupNormalJeffreys()
    layer = BayesianLinear(6, 2, prior=prior)
    posteriors = _guide_with_spread(layer).distributions()
    torch.manual_seed(3)
    fast = prior.draw_scale(layer.site(), 6, posteriors, 5)
    torch.manual_seed(3)
    generic = draw_group_scale(prior, layer.site(), 6, posteriors, 5)
    torch.testing.assert_close(fast, generic, rtol=0, atol=0)


def test_horseshoe_with_other_guide_families_falls_back_to_the_model():
    prior = GroupHorseshoe()
    layer = BayesianLinear(3, 2, prior=prior)
    posteriors = pyro_bc.StructuredGuide(layer).distributions()
    name = layer.site()
    # a Gamma guide of a local factor: not log-normal, so not the two-Normal shortcut
    posteriors[f"{name}.local_a"] = dist.Gamma(torch.full((3,), 2.0), 2.0).to_event(1)
    draws = prior.draw_scale(name, 3, posteriors, 4000)
    assert draws.shape == (4000, 3) and (draws > 0).all()
    with pytest.raises(KeyError, match="local_b"):
        prior.draw_scale(name, 3, {k: v for k, v in posteriors.items() if "local_b" not in k}, 2)
