import math

import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from test_compression import CASES, _loader, _set_posterior

import pyro_bc
from pyro_bc.compression import thin_posterior
from pyro_bc.gather import Gather
from pyro_bc.models import LeNet300100
from pyro_bc.nn import BayesianLayer
from pyro_bc.priors import GroupHorseshoe


def _thresholds(guide):
    """-3 for every layer: the groups _set_posterior prunes go, the others stay."""
    return {layer.name: -3.0 for layer in guide.layers}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("calibrated", [False, True])
def test_thinned_posterior_mean_equals_the_unquantized_compressed_network(case, calibrated):
    network, pruned = CASES[case]
    model = network()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    calibration = _loader(torch.randn(9, *model.input_shape)) if calibrated else None
    compressed = pyro_bc.compress(guide, -3.0, bits=None, calibration=calibration)
    small = thin_posterior(guide, -3.0, calibration=calibration)
    small.model.eval()
    x = torch.randn(5, *model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(
            pyro_bc.predict_logits(small.model, small, x), compressed(x), rtol=1e-5, atol=1e-5
        )
    # the Bayesian layers have exactly the kept shapes
    kept = {layer.name.replace(".", "_"): layer.kept_shape for layer in compressed.report.layers}
    for layer in small.model.bayesian_layers():
        assert tuple(layer.weight_shape) == kept[layer.site()]


def test_thinned_factors_are_the_kept_slices_of_the_trained_ones():
    network, pruned = CASES["lenet300"]
    model = network()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    small = thin_posterior(guide, _thresholds(guide))
    masks = pyro_bc.group_masks(guide, _thresholds(guide))
    for old, new in zip(guide.layers, small.layers, strict=True):
        mask = masks[old.name]
        torch.testing.assert_close(new.scale_factors[0].loc, old.scale_factors[0].loc[mask.in_keep])
        torch.testing.assert_close(
            new.weight.log_var, old.weight.log_var[mask.out_keep][:, mask.in_keep]
        )
    # fc1 reads 784 - 262 pixels through a Gather; the model is not changed
    assert isinstance(small.model.fc1_gather, Gather)
    assert small.model.fc1.in_features == 784 - len(pruned["fc1"])
    assert model.fc1.in_features == 784


def test_horseshoe_keeps_global_sites_and_slices_local_ones():
    model = LeNet300100(prior=GroupHorseshoe())
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            for factor in layer.scale_factors:
                factor.loc.add_(0.3 * torch.randn(factor.loc.shape))
        fc2 = {f.site: f for f in guide.layers[1].scale_factors}
        fc2["fc2.local_a"].log_var[:40] = 3.0  # log alpha > 0: pruned at threshold 0
    small = thin_posterior(guide, 0.0)
    new = {f.site: f for f in small.layers[1].scale_factors}
    for site, factor in fc2.items():
        if factor.loc.dim() and factor.loc.shape[0] == 300:
            torch.testing.assert_close(new[site].loc, factor.loc[40:])
        else:
            torch.testing.assert_close(new[site].loc, factor.loc)
    assert small.model.fc2.in_features == 260 and small.model.fc1.out_features == 260


def test_thinned_posterior_trains_and_compresses_again_to_the_same_network():
    network, pruned = CASES["lenet5"]
    model = network(dataset_size=32)
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    small = thin_posterior(guide, -3.0)
    # compressing it with nothing more pruned gives the first compression's network
    again = pyro_bc.compress(small, math.inf, bits=None)
    first = pyro_bc.compress(guide, -3.0, bits=None)
    assert (
        again.report.architecture.split(" -> ")[-1] == first.report.architecture.split(" -> ")[-1]
    )
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), first(x), rtol=1e-5, atol=1e-5)
    # pruning more of it equals pruning more of the original (no calibration: pruned = zero)
    stricter = {"conv1": -3.0, "conv2": -3.0, "fc1": -3.0, "fc2": -3.0}
    layers = {layer.name: layer for layer in guide.layers}
    with torch.no_grad():
        for name, group in (("conv2", 7), ("fc1", 20)):  # kept groups pruned now
            layers[name].scale_factors[0].log_var[group] = 2.0
    more = pyro_bc.compress(thin_posterior(guide, -3.0), stricter, bits=None)
    expected = pyro_bc.compress(guide, stricter, bits=None)
    with torch.no_grad():
        torch.testing.assert_close(more(x), expected(x), rtol=1e-5, atol=1e-5)
    # it is a Pyro model and guide: one SVI step moves its parameters
    y = torch.randint(0, 10, (3,))
    loss = TraceMeanField_ELBO().differentiable_loss(small.model, small, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in small.parameters())
    layers = [m for m in small.model.modules() if isinstance(m, BayesianLayer)]
    assert [layer.site() for layer in layers] == ["conv1", "conv2", "fc1", "fc2"]
