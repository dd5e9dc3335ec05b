import math
from collections import OrderedDict

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyro_bc
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork


def _trace(model, guide, *args):
    guide_trace = pyro.poutine.trace(guide).get_trace(*args)
    return pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(*args)


def test_network_trace_shows_every_site_with_its_name():
    model = BayesianNetwork(
        OrderedDict(
            conv=BayesianConv2d(1, 3, 3),
            flatten=nn.Flatten(),
            fc=BayesianLinear(3 * 4 * 4, 5, bias=False),
        ),
        dataset_size=100,
    )
    guide = pyro_bc.StructuredGuide(model)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    trace = _trace(model, guide, x, y)
    sites = {n: tuple(s["value"].shape) for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert sites == {
        "conv.scale": (3,),
        "conv.weight": (3, 1, 3, 3),
        "conv.bias": (3,),
        "fc.scale": (48,),
        "fc.weight": (5, 48),
        "data": (4,),
        "obs": (4,),
    }
    assert trace.nodes["obs"]["is_observed"]
    # the likelihood of a mini-batch is scaled to the data set
    assert trace.nodes["obs"]["scale"] == pytest.approx(100 / 4)


def test_standalone_layer_is_named_after_its_class():
    layer = BayesianLinear(3, 2)
    guide = pyro_bc.StructuredGuide(layer)
    trace = _trace(layer, guide, torch.randn(5, 3))
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names == ["BayesianLinear.scale", "BayesianLinear.weight", "BayesianLinear.bias"]


def test_sampled_output_is_the_layer_with_weights_z_times_theta():
    layer = BayesianLinear(4, 3)
    guide = pyro_bc.StructuredGuide(layer)
    x = torch.randn(7, 4)
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    out = pyro.poutine.replay(layer, trace=guide_trace)(x)
    z = guide_trace.nodes["BayesianLinear.scale"]["value"]
    theta = guide_trace.nodes["BayesianLinear.weight"]["value"]
    bias = guide_trace.nodes["BayesianLinear.bias"]["value"]
    torch.testing.assert_close(out, x @ (theta * z).T + bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(stride=2),
        dict(padding=1),
        dict(dilation=2, padding=2),
        dict(groups=2),
        dict(padding="same", bias=False),
    ],
)
def test_conv_options_match_torch(kwargs):
    layer = BayesianConv2d(4, 6, 3, **kwargs)
    guide = pyro_bc.StructuredGuide(layer)
    x = torch.randn(2, 4, 9, 9)
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    out = pyro.poutine.replay(layer, trace=guide_trace)(x)
    z = guide_trace.nodes["BayesianConv2d.scale"]["value"]
    theta = guide_trace.nodes["BayesianConv2d.weight"]["value"]
    bias = guide_trace.nodes["BayesianConv2d.bias"]["value"] if layer.has_bias else None
    reference = nn.Conv2d(4, 6, 3, **kwargs)
    expected = (
        F.conv2d(
            x,
            theta,
            bias,
            reference.stride,
            reference.padding,
            reference.dilation,
            reference.groups,
        )
        * z[:, None, None]
    )
    torch.testing.assert_close(out, expected)


def test_conv_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="divisible by groups"):
        BayesianConv2d(3, 4, 3, groups=2)


def test_sizes_and_dataset_size_must_be_positive_integers():
    for make, shape in [
        (lambda: BayesianLinear(0, 5), r"\(5, 0\)"),
        (lambda: BayesianLinear(2.5, 5), r"\(5, 2.5\)"),
        (lambda: BayesianConv2d(1, 4, 0), r"\(4, 1, 0, 0\)"),
    ]:
        with pytest.raises(ValueError, match=rf"sizes must be positive integers.*{shape}"):
            make()
    layers = OrderedDict(fc1=BayesianLinear(6, 5))
    for wrong in [0, 1.5, True]:
        with pytest.raises(ValueError, match="BayesianNetwork: dataset_size must be a positive"):
            BayesianNetwork(layers, dataset_size=wrong)
    assert BayesianNetwork(layers, dataset_size=np.int64(16)).dataset_size == 16


@pytest.mark.parametrize("bias", [True, False])
def test_dense_moments_given_the_scales_are_sums_over_the_inputs(bias):
    # out_j = sum_i x_i z_i theta_ji + b_j, every theta_ji ~ N(m_ji, v_ji) and b_j ~ N(mb_j, vb_j)
    # independent: mean sum_i x_i z_i m_ji + mb_j, variance sum_i (x_i z_i)^2 v_ji + vb_j
    layer = BayesianLinear(4, 3, bias=bias)
    x, z = torch.randn(2, 4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    m, v = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    mb, vb = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    mean, var = layer.moments(x, z, m, v, mb if bias else None, vb if bias else None)
    for n in range(2):
        for j in range(3):
            terms = [(x[n, i] * z[i], m[j, i], v[j, i]) for i in range(4)]
            expected_mean = sum(xz * mu for xz, mu, _ in terms) + (mb[j] if bias else 0)
            expected_var = sum(xz**2 * s2 for xz, _, s2 in terms) + (vb[j] if bias else 0)
            assert mean[n, j].item() == pytest.approx(float(expected_mean), rel=1e-12)
            assert var[n, j].item() == pytest.approx(float(expected_var), rel=1e-12)


def test_conv_moments_given_the_scales_are_sums_over_the_receptive_field():
    # out_c(p) = z_c (sum over the window of x theta_c + b_c): mean z_c (sum x m_c + mb_c),
    # variance z_c^2 (sum x^2 v_c + vb_c); padding 1 adds zeros around the 4x4 input
    layer = BayesianConv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    z = torch.rand(3, dtype=torch.float64) + 0.5
    m, v = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.rand(3, 2, 3, 3, dtype=torch.float64)
    mb, vb = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    mean, var = layer.moments(x, z, m, v, mb, vb)
    padded = F.pad(x, (1, 1, 1, 1))[0]
    for c in range(3):
        for row in range(4):
            for col in range(4):
                window = padded[:, row : row + 3, col : col + 3]
                expected_mean = z[c] * ((window * m[c]).sum() + mb[c])
                expected_var = z[c] ** 2 * ((window**2 * v[c]).sum() + vb[c])
                assert mean[0, c, row, col].item() == pytest.approx(expected_mean.item(), rel=1e-12)
                assert var[0, c, row, col].item() == pytest.approx(expected_var.item(), rel=1e-12)


def test_predictive_runs_with_the_guide():
    model = BayesianNetwork([nn.Flatten(), BayesianLinear(4, 3)])
    guide = pyro_bc.StructuredGuide(model)
    predictive = pyro.infer.Predictive(model, guide=guide, num_samples=5, return_sites=["obs"])
    samples = predictive(torch.randn(6, 1, 2, 2))
    assert samples["obs"].shape == (5, 6)
    assert samples["obs"].max() < 3


# --- batch norm inside a conv layer: the group scale sits after it ---


def _bn_layer(out_channels=3, **kwargs):
    """A conv layer with batch norm whose running statistics and affine parameters are not
    the identity, so that eval mode is a real affine map."""
    layer = BayesianConv2d(2, out_channels, 3, padding=1, bias=False, batch_norm=True, **kwargs)
    bn = layer.batch_norm
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return layer


def _noisy_guide(layer, scale_loc, scale_var, weight_var):
    guide = pyro_bc.StructuredGuide(layer)
    posterior = guide.layers[0]
    with torch.no_grad():
        posterior.scale_factors[0].loc.copy_(torch.as_tensor(scale_loc))
        posterior.scale_factors[0].log_var.fill_(math.log(scale_var))
        posterior.weight.log_var.fill_(math.log(weight_var))
    return guide, posterior


def _run(handler, layer, guide, x):
    with torch.no_grad(), handler():
        guide_trace = pyro.poutine.trace(guide).get_trace(x)
        return pyro.poutine.replay(layer, trace=guide_trace)(x)


def test_conv_with_batch_norm_needs_no_bias():
    with pytest.raises(ValueError, match="bias=False"):
        BayesianConv2d(2, 3, 3, batch_norm=True)


@pytest.mark.parametrize("training", [True, False])
def test_a_channel_with_zero_scale_outputs_exactly_zero_after_batch_norm(training):
    layer = _bn_layer().train(training)
    guide = pyro_bc.StructuredGuide(layer)
    posterior = guide.layers[0]
    x = torch.randn(16, 2, 5, 5)
    z = torch.tensor([1.3, 0.0, 0.7])
    weight, var = posterior.weight.loc.detach(), posterior.weight.log_var.detach().exp()
    out = layer.apply(x, z, weight, None)
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, [0, 2]] != 0)
    # local reparameterization: per-example scales, one of them zero for channel 1 in example 0
    z_per_example = torch.rand(16, 3) + 0.5
    z_per_example[0, 1] = 0.0
    sampled = layer.sample_output(x, z_per_example, weight, var, None, None)
    assert torch.all(sampled[0, 1] == 0) and torch.all(sampled[1:, 1] != 0)
    # posterior mean: a scale whose posterior mean is zero
    with torch.no_grad():
        posterior.scale_factors[0].loc[1] = 0.0
    out = _run(pyro_bc.poutine.posterior_mean, layer, guide, x)
    assert torch.all(out[:, 1] == 0) and torch.all(out[:, [0, 2]] != 0)


def test_batch_norm_layer_moments_in_eval_mode_match_monte_carlo():
    layer = _bn_layer().eval()
    scale_loc, scale_var, weight_var = torch.tensor([1.0, 0.6, 1.5]), 0.05, 0.02
    guide, posterior = _noisy_guide(layer, scale_loc, scale_var, weight_var)
    x1 = torch.randn(1, 2, 4, 4)
    n = 20_000
    draws = _run(pyro_bc.poutine.local_reparameterization, layer, guide, x1.expand(n, -1, -1, -1))

    # analytic: h ~ N(m, v) per element, BN(h) = a h + c, out = z (a h + c) with z independent
    bn = layer.batch_norm
    a = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    c = (bn.bias - a * bn.running_mean).detach()
    mu = posterior.weight.loc.detach()
    m = F.conv2d(x1, mu, padding=1)[0]
    v = F.conv2d(x1.pow(2), torch.full_like(mu, weight_var), padding=1)[0]
    a, c = a[:, None, None], c[:, None, None]
    ez, ez2 = scale_loc[:, None, None], scale_loc[:, None, None].pow(2) + scale_var
    mean = ez * (a * m + c)
    var = ez2 * a.pow(2) * v + scale_var * (a * m + c).pow(2)
    se = (var / n).sqrt()
    assert (draws.mean(0) - mean).abs().max() < 5 * se.max()
    torch.testing.assert_close(draws.var(0), var, rtol=0.06, atol=1e-4)
    # the analytic moments of the layer are the same
    moments = layer.moments(x1, scale_loc, mu, torch.full_like(mu, weight_var), None, None)
    torch.testing.assert_close(moments[0][0], mean)
    torch.testing.assert_close(moments[1][0], ez.pow(2) * a.pow(2) * v)
    # posterior mean: E[z] (a conv(x, mu) + c)
    torch.testing.assert_close(_run(pyro_bc.poutine.posterior_mean, layer, guide, x1)[0], mean)


def test_batch_norm_layer_in_training_normalises_the_sampled_preactivation():
    # A 1x1 output: in training, batch norm standardises each channel over the batch of
    # sampled pre-activations h ~ N(m, v), then the per-example scale multiplies it, so
    # E[out] = E[z] beta and Var[out] = E[z^2] gamma^2 + Var[z] beta^2 (v >> eps).
    layer = BayesianConv2d(2, 3, 4, bias=False, batch_norm=True, bn_momentum=1.0)
    with torch.no_grad():
        layer.batch_norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.batch_norm.bias.copy_(torch.tensor([1.0, -0.5, 0.0]))
    scale_loc, scale_var, weight_var = torch.tensor([1.0, 0.6, 1.5]), 0.05, 0.02
    guide, posterior = _noisy_guide(layer, scale_loc, scale_var, weight_var)
    x1 = torch.randn(1, 2, 4, 4)
    n = 20_000
    draws = _run(pyro_bc.poutine.local_reparameterization, layer, guide, x1.expand(n, -1, -1, -1))
    draws = draws[:, :, 0, 0]
    gamma, beta = layer.batch_norm.weight.detach(), layer.batch_norm.bias.detach()
    mean = scale_loc * beta
    var = (scale_loc.pow(2) + scale_var) * gamma.pow(2) + scale_var * beta.pow(2)
    assert (draws.mean(0) - mean).abs().max() < 5 * (var / n).sqrt().max()
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=0)
    # batch norm saw samples of the conv, not its mean: the batch variance is v, not 0
    mu = posterior.weight.loc.detach()
    m = F.conv2d(x1, mu)[0, :, 0, 0]
    v = F.conv2d(x1.pow(2), torch.full_like(mu, weight_var))[0, :, 0, 0]
    tolerance = 5 * v.max().sqrt() / n**0.5
    torch.testing.assert_close(layer.batch_norm.running_mean, m, rtol=0, atol=tolerance)
    torch.testing.assert_close(layer.batch_norm.running_var, v, rtol=0.05, atol=0)


def test_batch_norm_folds_into_a_plain_conv_in_eval_mode():
    layer = _bn_layer(out_channels=4, stride=2).eval()
    x = torch.randn(5, 2, 7, 7)
    z = torch.tensor([0.9, 0.0, 2.0, 0.3])
    weight = torch.randn(layer.weight_shape)
    a, c = layer.batch_norm_affine()
    h = F.conv2d(x, weight, None, 2, 1)
    torch.testing.assert_close(layer.batch_norm(h), a[:, None, None] * h + c[:, None, None])
    folded_weight, folded_bias = layer.plain_weights(z, weight, None)
    torch.testing.assert_close(folded_weight, (z * a)[:, None, None, None] * weight)
    torch.testing.assert_close(folded_bias, z * c)
    expected = layer.apply(x, z, weight, None)
    torch.testing.assert_close(F.conv2d(x, folded_weight, folded_bias, 2, 1), expected)


@pytest.mark.parametrize("make", [lambda: BayesianConv2d(2, 4, 3), lambda: BayesianLinear(6, 4)])
def test_plain_weights_without_batch_norm_reproduce_the_layer(make):
    layer = make()
    x = torch.randn(3, 2, 5, 5) if layer.kind == "conv" else torch.randn(3, 6)
    z = torch.rand(layer.num_groups)
    weight, bias = torch.randn(layer.weight_shape), torch.randn(layer.bias_shape)
    plain_weight, plain_bias = layer.plain_weights(z, weight, bias)
    plain = F.conv2d if layer.kind == "conv" else F.linear
    torch.testing.assert_close(plain(x, plain_weight, plain_bias), layer.apply(x, z, weight, bias))
    assert layer.weight_shape[layer.group_dim] == layer.num_groups


def _bn_network():
    return BayesianNetwork(
        OrderedDict(
            conv=BayesianConv2d(1, 3, 3, bias=False, batch_norm=True),
            relu=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=BayesianLinear(3 * 4 * 4, 2),
        ),
        dataset_size=100,
    )


def test_fit_trains_the_batch_norm_affine_parameters():
    model = _bn_network()
    guide = pyro_bc.StructuredGuide(model)
    bn = model.conv.batch_norm
    before = [p.detach().clone() for p in (bn.weight, bn.bias)]
    running_before = bn.running_mean.clone()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 2, (8,))
    pyro_bc.fit(model, guide, [(x, y)], epochs=2, lr=0.01, progress=False)
    assert all(not torch.equal(p, b) for p, b in zip((bn.weight, bn.bias), before, strict=True))
    assert not torch.equal(bn.running_mean, running_before)


def test_pyro_svi_trains_the_batch_norm_of_each_model_it_is_given():
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 2, (8,))
    for _ in range(2):  # a second model with the same layer names has batch norms of its own
        model = _bn_network()
        guide = pyro_bc.StructuredGuide(model)
        bn = model.conv.batch_norm
        before = [p.detach().clone() for p in (bn.weight, bn.bias)]
        elbo = pyro.infer.TraceMeanField_ELBO()
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        with pyro_bc.poutine.local_reparameterization():
            svi.step(x, y)
        assert all(not torch.equal(p, b) for p, b in zip((bn.weight, bn.bias), before, strict=True))
