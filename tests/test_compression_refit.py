"""refit: the chosen network trained on all the training data, same groups and bit widths."""

import pytest
import torch
from test_compression_budget import USELESS, _model_and_data
from torch.utils.data import ConcatDataset, DataLoader

import pyro_bc
from pyro_bc.compression import compress_retrained, refit, thin_posterior


def _chosen(seed=0):
    """A network chosen within a validation budget on a small trained-looking posterior, and
    a loader of its training and validation examples together."""
    model, guide, loader = _model_and_data(seed=seed)
    model.dataset_size = len(loader.dataset)
    chosen = pyro_bc.compress(
        guide, calibration=loader, validation=loader, max_error_increase=0.05, bits="auto"
    )
    _, _, more = _model_and_data(seed=seed + 10, n=200)
    everything = DataLoader(ConcatDataset([loader.dataset, more.dataset]), batch_size=100)
    return chosen, guide, everything


def test_the_refitted_network_keeps_the_groups_bits_and_rates_and_says_so():
    chosen, guide, everything = _chosen()
    refitted, thinned = refit(chosen, guide, everything, epochs=2, lr=1e-2, seed=0)
    before, after = chosen.report, refitted.report
    assert after.architecture == before.architecture
    assert after.layers[0].groups_kept == 8 - len(USELESS)
    assert [layer.frac_bits for layer in after.layers] == [
        layer.frac_bits for layer in before.layers
    ]
    assert after.pruning_rate == before.pruning_rate
    assert [(layer.threshold, layer.threshold_rule, layer.bits_rule) for layer in after.layers] == [
        (layer.threshold, layer.threshold_rule, layer.bits_rule) for layer in before.layers
    ]
    assert {layer.threshold_rule for layer in after.layers} == {"budget"}
    assert thinned.model.dataset_size == 600
    assert after.validation_error is None  # the validation examples were trained on
    assert after.refit["examples"] == 600
    assert after.refit["chosen_validation_error"] == before.validation_error
    assert "600 training examples" in str(after)
    # the weights learned: the refitted network is not the chosen one
    x = torch.randn(50, 8)
    assert not torch.allclose(refitted(x), chosen(x))


def test_refit_is_thinning_fitting_and_compressing_with_the_same_bits():
    chosen, guide, everything = _chosen(seed=1)
    refitted, _ = refit(chosen, guide, everything, epochs=3, lr=1e-2, seed=5)
    thresholds = {layer.name: layer.threshold for layer in chosen.report.layers}
    thinned = thin_posterior(guide, thresholds, calibration=everything)
    thinned.model.dataset_size = 600
    pyro_bc.fit(
        thinned.model,
        thinned,
        everything,
        epochs=3,
        lr=1e-2,
        lr_schedule=pyro_bc.infer.linear_decay(0, 3),
        seed=5,
        progress=False,
    )
    by_hand = pyro_bc.compress(
        thinned,
        float("inf"),
        bits={layer.name: layer.frac_bits for layer in chosen.report.layers},
        calibration=everything,
    )
    x = torch.randn(50, 8)
    assert torch.equal(refitted(x), by_hand(x))


def test_a_retrained_network_refits_from_its_thinned_posterior_and_keeps_its_record():
    model, guide, loader = _model_and_data()
    model.dataset_size = len(loader.dataset)
    retrained, thinned = compress_retrained(
        guide,
        loader,
        validation=loader,
        max_error_increase=0.0,
        prune_error_increase=0.0,
        epochs=1,
        lr=1e-3,
        seed=0,
    )
    refitted, _ = refit(retrained, thinned, loader, epochs=1, lr=1e-3)
    assert refitted.report.architecture == retrained.report.architecture
    assert refitted.report.retraining == retrained.report.retraining


def test_a_posterior_that_is_not_the_networks_is_refused_with_what_to_pass():
    chosen, _, everything = _chosen()
    _, untrained, _ = _model_and_data(seed=3)  # keeps every group at the chosen thresholds
    with torch.no_grad():
        untrained.layers[0].scale_factors[0].log_var.fill_(-10.0)
    with pytest.raises(ValueError, match="the guide compressed was compressed from"):
        refit(chosen, untrained, everything, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        refit(chosen, untrained, everything, epochs=0, lr=1e-3)
