"""The handlers against the analytic moments of the pre-activation under the guide."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO

import pyro_bc
from pyro_bc.models import LeNet300100
from pyro_bc.nn import BayesianConv2d, BayesianLinear
from pyro_bc.poutine import local_reparameterization, posterior_mean
from pyro_bc.priors import GroupHorseshoe


def _spread_guide(guide):
    """Wider posteriors than the initial ones, so the moments are far from trivial."""
    with torch.no_grad():
        for layer in guide.layers:
            for factor in [*layer.scale_factors, layer.weight, layer.bias]:
                if factor is not None:
                    factor.log_var.uniform_(-4, -1)
            layer.scale_factors[0].loc.uniform_(0.5, 1.5)
            if layer.bias is not None:
                layer.bias.loc.normal_()
    return guide


def _run(layer, guide, x, handler):
    with handler:
        guide_trace = pyro.poutine.trace(guide).get_trace(x)
        return pyro.poutine.replay(layer, trace=guide_trace)(x)


def _posterior(guide):
    (layer,) = guide.layers
    scale = layer.scale_factors[0]
    bias = (0.0, 0.0) if layer.bias is None else (layer.bias.loc, layer.bias.log_var.exp())
    tensors = (scale.loc, scale.log_var.exp(), layer.weight.loc, layer.weight.log_var.exp(), *bias)
    return tuple(torch.as_tensor(t).detach() for t in tensors)


def _dense_moments(x, guide):
    mz, vz, mw, vw, mb, vb = _posterior(guide)
    mean = F.linear(x * mz, mw) + mb
    # Var[z theta] = E[z^2] E[theta^2] - (E z E theta)^2, independent across inputs
    var_zw = (mz**2 + vz) * (mw**2 + vw) - (mz * mw) ** 2
    return mean, F.linear(x**2, var_zw) + vb


def _conv_moments(x, guide, layer):
    mz, vz, mw, vw, mb, vb = _posterior(guide)
    m = layer._conv(x, mw, mb)
    v = layer._conv(x**2, vw, vb)
    mz, vz = mz[:, None, None], vz[:, None, None]
    return mz * m, (mz**2 + vz) * (m**2 + v) - (mz * m) ** 2


def _check_moments(samples, mean, var):
    # samples: (N, ...) draws for one input; compare to the analytic moments within MC error
    n = samples.shape[0]
    se_mean = (var / n).sqrt()
    assert ((samples.mean(0) - mean).abs() <= 5 * se_mean + 1e-6).all()
    # the sample variance's standard error, sqrt((mu_4 - var^2) / n), from the draws' fourth
    # central moment: products of normals have heavier tails than a normal (mu_4 = 3 var^2)
    mu_4 = (samples - mean).pow(4).mean(0)
    se_var = ((mu_4 - var**2).clamp_min(0) / n).sqrt()
    assert ((samples.var(0) - var).abs() <= 6 * se_var + 1e-6).all()


@pytest.mark.parametrize("mode", ["local", "sample"])
def test_dense_output_moments(mode):
    layer = BayesianLinear(5, 3)
    guide = _spread_guide(pyro_bc.StructuredGuide(layer))
    x = torch.randn(1, 5)
    n = 20_000
    if mode == "local":
        # one batch of copies: the group scale is drawn per data point
        samples = _run(layer, guide, x.expand(n, 5), local_reparameterization())
    else:
        samples = torch.cat(
            [_run(layer, guide, x, pyro.poutine.messenger.Messenger()) for _ in range(n // 4)]
        )
        n = samples.shape[0]
    mean, var = _dense_moments(x, guide)
    _check_moments(samples.detach(), mean[0], var[0])


@pytest.mark.parametrize("mode", ["local", "sample"])
def test_conv_output_moments(mode):
    layer = BayesianConv2d(2, 3, 3, padding=1)
    guide = _spread_guide(pyro_bc.StructuredGuide(layer))
    x = torch.randn(1, 2, 4, 4)
    n = 20_000
    if mode == "local":
        samples = _run(layer, guide, x.expand(n, 2, 4, 4), local_reparameterization())
    else:
        samples = torch.cat(
            [_run(layer, guide, x, pyro.poutine.messenger.Messenger()) for _ in range(n // 4)]
        )
    mean, var = _conv_moments(x, guide, layer)
    _check_moments(samples.detach(), mean[0], var[0])


def test_local_reparameterization_draws_scale_per_data_point():
    layer = BayesianLinear(1, 1, bias=False)
    guide = _spread_guide(pyro_bc.StructuredGuide(layer))
    x = torch.ones(4000, 1)
    out = _run(layer, guide, x, local_reparameterization()).detach()
    # With one scale per batch, the outputs would be draws of N(z mu, z^2 s^2) for one z; per data
    # point they are the marginal, whose variance is larger by Var[z] (mu^2 + s^2).
    mean, var = _dense_moments(x[:1], guide)
    assert out.var() == pytest.approx(var.item(), rel=0.1)


def test_posterior_mean_uses_mean_weights():
    layer = BayesianLinear(5, 3)
    guide = _spread_guide(pyro_bc.StructuredGuide(layer))
    x = torch.randn(8, 5)
    out = _run(layer, guide, x, posterior_mean())
    mz, _, mw, _, mb, _ = _posterior(guide)
    torch.testing.assert_close(out, x @ (mw * mz).T + mb)


def test_posterior_mean_conv_scales_filters():
    layer = BayesianConv2d(2, 3, 3)
    guide = _spread_guide(pyro_bc.StructuredGuide(layer))
    x = torch.randn(2, 2, 5, 5)
    out = _run(layer, guide, x, posterior_mean())
    mz, _, mw, _, mb, _ = _posterior(guide)
    torch.testing.assert_close(out, F.conv2d(x, mw * mz[:, None, None, None], mb * mz))


def test_local_reparameterization_lowers_gradient_variance():
    torch.manual_seed(0)
    model = LeNet300100(dataset_size=60_000)
    guide = pyro_bc.StructuredGuide(model)
    _spread_guide(guide)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    elbo = TraceMeanField_ELBO()
    loc = guide.layers[1].weight.loc  # fc2's weight means

    def gradients(handler, repeats=30):
        grads = []
        for _ in range(repeats):
            with pyro.validation_enabled(False), handler():
                loss = elbo.differentiable_loss(model, guide, x, y)
            (grad,) = torch.autograd.grad(loss, [loc])
            grads.append(grad)
        return torch.stack(grads).var(0).sum()

    lrt = gradients(local_reparameterization)
    sampled = gradients(pyro.poutine.messenger.Messenger)
    print(f"gradient variance, weight sampling / local reparameterization: {sampled / lrt:.1f}")
    assert sampled > 2 * lrt


def _half_cauchy_groups(name, num_groups):
    # no closed-form KL with a log-normal guide: the ELBO needs a drawn value
    return pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))


@pytest.mark.parametrize("handler", [local_reparameterization, posterior_mean])
def test_handlers_draw_scale_sites_only_where_the_elbo_needs_a_value(handler):
    closed = BayesianLinear(4, 2, prior=GroupHorseshoe())
    monte_carlo = BayesianLinear(4, 2, prior=_half_cauchy_groups)
    for layer, drawn in ((closed, False), (monte_carlo, True)):
        guide = _spread_guide(pyro_bc.StructuredGuide(layer))
        with handler():
            trace = pyro.poutine.trace(guide).get_trace()
        for factor in guide.layers[0].scale_factors:
            value = trace.nodes[factor.site]["value"]
            # undrawn sites hold a placeholder of ones; a draw from a spread guide never does
            assert (value != 1).any() == drawn, factor.site
    # without a handler the guide is an ordinary Pyro guide: every site is drawn
    trace = pyro.poutine.trace(_spread_guide(pyro_bc.StructuredGuide(closed))).get_trace()
    assert (trace.nodes[f"{closed.site()}.local_a"]["value"] != 1).all()
