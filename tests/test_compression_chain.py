"""compress proves the chain from a traced forward pass and refuses anything else."""

from collections import OrderedDict

import pyro
import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc.compression import trace_chain
from pyro_bc.nn import BayesianLinear, BayesianNetwork


class _Custom(BayesianNetwork):
    """A BayesianNetwork whose forward is written by hand (``forward_layers``)."""

    def __init__(self, forward_layers, **layers):
        super().__init__(OrderedDict(layers), input_shape=(4,))
        self.__dict__["forward_layers"] = forward_layers

    def forward(self, x, y=None):
        logits = self.forward_layers(self, x)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits


def _skip(m, x):
    h = m.relu(m.fc1(x))
    return m.fc2(h + x[:, :3])


def _summed(m, x):
    return m.fc2(m.relu(m.fc1(x)) + m.relu(m.fc3(x)))


def _reused(m, x):
    return m.fc2(m.relu(m.fc1(m.relu(m.fc1(x)))))


def _two_layers(**extra):
    return dict(fc1=BayesianLinear(4, 3), relu=nn.ReLU(), fc2=BayesianLinear(3, 2), **extra)


@pytest.mark.parametrize(
    "forward, layers, culprit, reason",
    [
        (_skip, _two_layers(), "fc2", "previous module's output"),
        (_summed, _two_layers(fc3=BayesianLinear(4, 3)), "fc3", "previous module's output"),
        (
            _reused,
            dict(fc1=BayesianLinear(4, 4), relu=nn.ReLU(), fc2=BayesianLinear(4, 2)),
            "fc1",
            "called more than once",
        ),
    ],
    ids=["skip connection", "two layers summed", "layer used twice"],
)
def test_non_chains_are_refused_naming_the_module(forward, layers, culprit, reason):
    model = _Custom(forward, **layers)
    guide = pyro_bc.StructuredGuide(model)
    with pytest.raises(ValueError, match=f"module '{culprit}'.*{reason}"):
        pyro_bc.compress(guide)


def test_the_chain_is_the_call_order_not_the_registration_order():
    def backwards(m, x):  # fc1 is registered last but runs first
        return m.fc2(m.relu(m.fc1(x)))

    layers = OrderedDict(fc2=BayesianLinear(3, 2), relu=nn.ReLU(), fc1=BayesianLinear(4, 3))
    model = _Custom(backwards, **layers)
    guide = pyro_bc.StructuredGuide(model)
    assert [link.name for link in trace_chain(guide)] == ["fc1", "relu", "fc2"]
    compressed = pyro_bc.compress(guide, bits=None, thresholds=10.0)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            compressed(x), pyro_bc.predict_logits(model, guide, x), rtol=1e-5, atol=1e-6
        )


def test_a_function_between_modules_is_refused():
    def functional(m, x):
        return m.fc2(torch.relu(m.fc1(x)))

    model = _Custom(functional, fc1=BayesianLinear(4, 3), fc2=BayesianLinear(3, 2))
    with pytest.raises(ValueError, match="module 'fc2'.*previous module's output"):
        pyro_bc.compress(pyro_bc.StructuredGuide(model))


def test_a_layer_the_forward_pass_never_runs_is_refused():
    def partial(m, x):
        return m.fc2(m.relu(m.fc1(x)))

    model = _Custom(partial, **_two_layers(unused=BayesianLinear(2, 2)))
    with pytest.raises(ValueError, match="never runs.*unused"):
        pyro_bc.compress(pyro_bc.StructuredGuide(model))
