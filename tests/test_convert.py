from collections import OrderedDict

import pytest
import torch
from torch import nn

import pyro_bc
from pyro_bc import priors
from pyro_bc.infer import predict_logits
from pyro_bc.nn import BayesianConv2d, BayesianLinear


def _mlp():
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(16, 12),
            relu1=nn.ReLU(),
            drop=nn.Dropout(0.5),
            fc2=nn.Linear(12, 8, bias=False),
            tanh=nn.Tanh(),
            fc3=nn.Linear(8, 3),
        )
    )


def _cnn():
    """A small CNN with batch norm, nested Sequentials, and trained-looking statistics."""
    features = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6, eps=1e-3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, bias=False),
        nn.BatchNorm2d(5),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(5, 4, 1, stride=1),
        nn.Identity(),
    )
    network = nn.Sequential(
        OrderedDict(features=features, flatten=nn.Flatten(), fc=nn.Linear(4, 3))
    )
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.2, 3)
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return network


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize(
    "prior", [priors.GroupNormalJeffreys(), priors.GroupHorseshoe(tau0=1e-3)], ids=repr
)
@pytest.mark.parametrize(
    "make, input_shape", [(_mlp, (1, 4, 4)), (_cnn, (2, 8, 8))], ids=["mlp", "cnn"]
)
def test_posterior_mean_network_is_the_trained_network(make, input_shape, prior, rescale):
    network = make().eval()
    model, guide = pyro_bc.bayesianize(
        network, prior, dataset_size=1000, input_shape=input_shape, rescale=rescale
    )
    model.eval()
    x = torch.randn(7, *input_shape)
    with torch.no_grad():
        expected = network(x)
        logits = predict_logits(model, guide, x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert model.input_shape == input_shape and model.dataset_size == 1000


def test_layer_names_and_kinds_follow_the_network():
    model, _ = pyro_bc.bayesianize(_cnn(), dataset_size=10)
    assert list(model._modules) == [
        "features_0",  # with the batch norm features_1 inside
        "features_2",
        "features_3",
        "features_4",
        "features_6",
        "features_7",
        "features_8",
        "features_9",
        "flatten",
        "fc",
    ]
    conv = model.features_0
    assert isinstance(conv, BayesianConv2d) and conv.batch_norm.eps == 1e-3
    assert not conv.has_bias  # folded into the batch norm's running mean
    assert model.features_8.batch_norm is None and model.features_8.has_bias
    assert isinstance(model.fc, BayesianLinear)
    model2, _ = pyro_bc.bayesianize(_mlp())
    assert list(model2._modules) == list(_mlp()._modules)
    assert not model2.fc2.has_bias


def test_converted_model_trains_with_fit():
    network = _cnn()
    model, guide = pyro_bc.bayesianize(network, dataset_size=100, input_shape=(2, 8, 8))
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    history = pyro_bc.fit(model, guide, [(x, y)], epochs=2, lr=1e-3, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history["loss"])))
    # the model's batch norms are its own, not the network's
    assert not torch.equal(model.features_0.batch_norm.weight, network.features[1].weight)


class _Custom(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize(
    "network, match",
    [
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), r"'0' is grouped \(groups=2\)"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), r"BatchNorm1d '1' does not directly"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)),
            r"BatchNorm2d '2' does not directly follow a Conv2d",
        ),
        (nn.Sequential(nn.Linear(4, 4), _Custom()), r"module '1' of type _Custom"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect")), "padding_mode='zeros'"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)),
            "track_running_stats=True",
        ),
        (nn.Linear(3, 2), "needs an nn.Sequential, got Linear"),
    ],
)
def test_refuses_what_it_cannot_convert_and_says_what_it_can(network, match):
    with pytest.raises((TypeError, ValueError), match=match) as error:
        pyro_bc.bayesianize(network)
    if "padding" not in match and "track" not in match:
        assert "supported: Linear, Conv2d" in str(error.value)
