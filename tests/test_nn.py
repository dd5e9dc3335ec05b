from collections import OrderedDict

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


def test_predictive_runs_with_the_guide():
    model = BayesianNetwork([nn.Flatten(), BayesianLinear(4, 3)])
    guide = pyro_bc.StructuredGuide(model)
    predictive = pyro.infer.Predictive(model, guide=guide, num_samples=5, return_sites=["obs"])
    samples = predictive(torch.randn(6, 1, 2, 2))
    assert samples["obs"].shape == (5, 6)
    assert samples["obs"].max() < 3
