"""compress(..., validation=, max_error_increase=): the smallest network within an error budget."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.nn import BayesianLinear, BayesianNetwork

USELESS = [0, 2, 4, 6]  # inputs whose weights are exactly zero: pruning them changes nothing


def _model_and_data(seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    model = BayesianNetwork(
        OrderedDict(fc1=BayesianLinear(8, 6), relu=nn.ReLU(), fc2=BayesianLinear(6, 3)),
        input_shape=(8,),
    )
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.fill_(1.0)
            scale.log_var.fill_(-10.0)  # log alpha = -10: kept by any usual threshold
            layer.weight.loc.copy_(torch.randn(layer.weight.loc.shape, generator=g))
            layer.weight.log_var.fill_(-12.0)
        fc1 = guide.layers[0]
        fc1.weight.loc[:, USELESS] = 0.0
        fc1.scale_factors[0].log_var[USELESS] = -1.0  # ranked most prunable
    x = torch.randn(n, 8, generator=g)
    # labels the dense posterior-mean network gets right: its validation error is 0
    y = pyro_bc.predict_logits(model, guide, x).argmax(-1).detach()
    return model, guide, DataLoader(TensorDataset(x, y), batch_size=100)


def test_zero_budget_prunes_exactly_what_changes_nothing():
    _, guide, validation = _model_and_data()
    compressed = pyro_bc.compress(guide, validation=validation, max_error_increase=0.0)
    report = compressed.report
    fc1 = report.layers[0]
    assert fc1.groups_kept == 8 - len(USELESS)
    assert report.validation_error == report.dense_validation_error == 0.0
    assert {layer.threshold_rule for layer in report.layers} == {"budget"}
    assert "budget" in str(report)


def test_the_budget_is_kept_and_a_larger_budget_never_compresses_less():
    _, guide, validation = _model_and_data(seed=1)
    rates = []
    for budget in (0.0, 0.05, 0.3):
        report = pyro_bc.compress(guide, validation=validation, max_error_increase=budget).report
        assert report.validation_error <= report.dense_validation_error + budget + 1e-12
        rates.append(report.pruning_rate)
    assert rates == sorted(rates)
    assert rates[-1] > rates[0]


def test_bits_are_lowered_only_within_the_budget():
    _, guide, validation = _model_and_data(seed=2)
    paper = pyro_bc.compress(guide).report
    budgeted = pyro_bc.compress(guide, validation=validation, max_error_increase=0.0).report
    for before, after in zip(paper.layers, budgeted.layers, strict=True):
        assert after.frac_bits <= before.frac_bits
        assert after.bits_rule == ("budget" if after.frac_bits < before.frac_bits else "variance")
    assert any(layer.bits_rule == "budget" for layer in budgeted.layers)
    assert budgeted.validation_error == 0.0


def test_bits_are_widened_where_the_papers_rule_alone_breaks_the_budget():
    _, guide, validation = _model_and_data(seed=3)
    with torch.no_grad():  # uncertain weights: the rule gives them few bits
        for layer in guide.layers:
            layer.weight.log_var.fill_(1.0)
    paper = pyro_bc.compress(guide).report
    assert paper.layers[0].frac_bits <= 1
    rounded = pyro_bc.compress(guide, thresholds=10.0)
    assert rounded.evaluate(validation)["error"] > 0.05
    budgeted = pyro_bc.compress(guide, validation=validation, max_error_increase=0.0).report
    assert budgeted.validation_error == 0.0
    assert any(
        after.frac_bits > before.frac_bits
        for before, after in zip(paper.layers, budgeted.layers, strict=True)
    )
    for before, after in zip(paper.layers, budgeted.layers, strict=True):
        expected = "variance" if after.frac_bits == before.frac_bits else "budget"
        assert after.bits_rule == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_error_increase": 0.01}, "go together"),
        ({"validation": "loader"}, "go together"),
        ({"validation": "loader", "max_error_increase": -0.1}, "fraction"),
    ],
)
def test_bad_budget_arguments(kwargs, match):
    _, guide, validation = _model_and_data()
    if kwargs.get("validation") == "loader":
        kwargs["validation"] = validation
    with pytest.raises(ValueError, match=match):
        pyro_bc.compress(guide, **kwargs)


def test_dense_error_is_measured_in_eval_mode():
    model = BayesianNetwork(
        OrderedDict(
            fc1=BayesianLinear(8, 6), drop=nn.Dropout(0.9), relu=nn.ReLU(), fc2=BayesianLinear(6, 3)
        ),
        input_shape=(8,),
    )
    _, guide_source, loader = _model_and_data()
    guide = pyro_bc.StructuredGuide(model)
    guide.load_state_dict(guide_source.state_dict())
    model.train()
    report = pyro_bc.compress(guide, thresholds=10.0, test_loader=loader).report
    # labels are the posterior-mean network's own predictions: dropout off, error 0
    assert report.dense_test_error == 0.0
    assert report.dense_test_error == pyro_bc.evaluate(model, guide, loader)["error"]
