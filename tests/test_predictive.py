import math
from collections import OrderedDict

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc import plots, predictive
from pyro_bc.nn import BayesianLinear, BayesianNetwork


def _model_and_guide(log_var=-9.0, seed=0):
    model = BayesianNetwork(
        OrderedDict(fc1=BayesianLinear(5, 8), relu=nn.ReLU(), fc2=BayesianLinear(8, 3)),
        dataset_size=100,
    )
    guide = pyro_bc.StructuredGuide(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.copy_(1 + 0.2 * torch.randn(scale.loc.shape, generator=g))
            scale.log_var.fill_(log_var)
            layer.weight.loc.copy_(torch.randn(layer.weight.loc.shape, generator=g))
            layer.weight.log_var.fill_(log_var)
            layer.bias.loc.copy_(0.3 * torch.randn(layer.bias.loc.shape, generator=g))
            layer.bias.log_var.fill_(log_var)
    return model, guide


def _loader(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=16)


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_entropy_of_uniform_is_log_k_and_of_a_certain_prediction_zero():
    for k in (2, 10, 37):
        assert predictive.entropy(torch.full((3, k), 1 / k)).tolist() == pytest.approx(
            [math.log(k)] * 3
        )
    assert predictive.entropy(torch.tensor([[0.0, 1.0, 0.0]])).item() == 0.0
    # a two-class case by hand: -(0.2 log 0.2 + 0.8 log 0.8)
    expected = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert predictive.entropy(torch.tensor([[0.2, 0.8]])).item() == pytest.approx(expected)


def test_nll_equals_cross_entropy():
    logits = torch.randn(50, 7) * 3
    labels = torch.randint(0, 7, (50,))
    nll = predictive.negative_log_likelihood(logits.softmax(-1), labels)
    assert nll == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    result = predictive.calibration(logits.softmax(-1), labels)
    assert result.nll == pytest.approx(nll)
    assert result.error == pytest.approx((logits.argmax(-1) != labels).float().mean().item())


def test_ece_of_an_exactly_calibrated_predictor_is_zero():
    # in each bin, a fraction c of the examples predicted with confidence c is right
    probs, labels = [], []
    for confidence, right in ((0.7, 7), (0.9, 9), (0.5, 5), (1.0, 10)):
        for i in range(10):
            probs.append([confidence, 1 - confidence])
            labels.append(0 if i < right else 1)
    probs = torch.tensor(probs, dtype=torch.float64)
    result = predictive.calibration(probs, torch.tensor(labels))
    assert result.ece == pytest.approx(0.0, abs=1e-12)
    assert result.bin_count.sum() == 40


def test_ece_of_a_calibrated_random_predictor_is_small():
    # confidences spread over (1/2, 1), each right with probability equal to its confidence
    g = torch.Generator().manual_seed(0)
    n = 200_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    right = torch.rand(n, generator=g, dtype=torch.float64) < confidence
    probs = torch.stack([confidence, 1 - confidence], -1)
    labels = (~right).long()
    ece = predictive.expected_calibration_error(probs, labels)
    # each of ~8 occupied bins has ~25k examples: sampling noise |acc - conf| ~ 0.003
    assert ece < 0.01


def test_ece_of_a_miscalibrated_predictor_equals_the_hand_computation():
    # 20 examples at confidence 0.95, 10 right; 10 at confidence 0.62, all right;
    # 10 at 0.34 over 3 classes (bin (4/15, 5/15] of 15), 1 right:
    # ECE = (20 |0.5 - 0.95| + 10 |1 - 0.62| + 10 |0.1 - 0.34|) / 40 = (9 + 3.8 + 2.4) / 40 = 0.38
    probs = [[0.95, 0.05, 0.0]] * 20 + [[0.62, 0.38, 0.0]] * 10 + [[0.34, 0.33, 0.33]] * 10
    labels = [0] * 10 + [1] * 10 + [0] * 10 + [0] + [2] * 9
    result = predictive.calibration(torch.tensor(probs), torch.tensor(labels))
    assert result.ece == pytest.approx(0.38)
    assert result.error == pytest.approx(19 / 40)
    occupied = result.bin_count.nonzero().flatten().tolist()
    assert occupied == [5, 9, 14]  # ceil(15 c) - 1 for c = 0.34, 0.62, 0.95
    assert result.bin_accuracy[occupied].tolist() == pytest.approx([0.1, 1.0, 0.5])
    assert result.bin_confidence[occupied].tolist() == pytest.approx([0.34, 0.62, 0.95])
    assert torch.isnan(result.bin_accuracy[0])
    # fewer bins: everything in one bin of 1 bin: |accuracy - mean confidence|
    one_bin = predictive.expected_calibration_error(
        torch.tensor(probs), torch.tensor(labels), num_bins=1
    )
    assert one_bin == pytest.approx(abs(21 / 40 - (20 * 0.95 + 10 * 0.62 + 10 * 0.34) / 40))


def test_bin_edges_belong_to_the_lower_bin():
    # (b-1)/B < c <= b/B: 0.5 is the top of bin 0 of 2
    probs = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.75, 0.25, 0.0]])
    result = predictive.calibration(probs, torch.tensor([0, 0, 0]), num_bins=2)
    assert result.bin_count.tolist() == [2, 1]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        predictive.calibration(torch.full((2, 2), 0.5), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="probs must be"):
        predictive.calibration(torch.full((2, 2), 0.5), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_bins"):
        predictive.calibration(torch.full((2, 2), 0.5), torch.tensor([0, 1]), num_bins=0)
    # logits, NaN, or float labels where probabilities and classes belong
    for probs in (torch.tensor([[2.0, -1.0]]), torch.tensor([[float("nan"), 1.0]])):
        with pytest.raises(ValueError, match="probs must be class probabilities.*softmax"):
            predictive.calibration(probs, torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        predictive.negative_log_likelihood(torch.full((1, 2), 0.5), torch.tensor([0.0]))
    model, guide = _model_and_guide()
    with pytest.raises(ValueError, match="num_samples"):
        predictive.predictive_probs(model, guide, torch.randn(2, 5), num_samples=0)
    empty = DataLoader(TensorDataset(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="yielded no batches"):
        predictive.network_metrics(nn.Linear(5, 3), empty)


# ---------------------------------------------------------------------------------------------
# The three predictors


def test_monte_carlo_average_of_a_deterministic_guide_equals_the_posterior_mean():
    # log-variance -60: every draw equals its mean to float precision
    model, guide = _model_and_guide(log_var=-60.0)
    x = torch.randn(9, 5)
    mc = predictive.predictive_probs(model, guide, x, num_samples=4)
    mean = predictive.posterior_mean_probs(model, guide, x)
    torch.testing.assert_close(mc, mean, rtol=1e-5, atol=1e-6)
    loader = _loader()
    a = predictive.predictive_metrics(model, guide, loader, num_samples=3)
    b = predictive.posterior_mean_metrics(model, guide, loader)
    assert a.nll == pytest.approx(b.nll, rel=1e-5)
    assert a.error == b.error and a.ece == pytest.approx(b.ece, abs=1e-6)


def test_monte_carlo_average_matches_pyro_predictive_and_its_own_mean():
    model, guide = _model_and_guide(log_var=-1.0)
    x = torch.randn(6, 5)
    # the MC average of softmax over draws, against draws taken by hand with the same seed
    pyro.set_rng_seed(3)
    mc = predictive.predictive_probs(model, guide, x, num_samples=5)
    pyro.set_rng_seed(3)
    by_hand = sum(
        pyro_bc.predict_logits(model, guide, x, mode="sample").softmax(-1) for _ in range(5)
    )
    torch.testing.assert_close(mc, by_hand / 5, rtol=1e-5, atol=1e-6)
    # Pyro's Predictive draws from the same distribution: two independent averages agree within
    # five standard errors of their difference, entry by entry
    n = 1000
    pyro.set_rng_seed(4)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=n, return_sites=["_RETURN"])(x)
    draws = draws["_RETURN"].softmax(-1)
    ours = predictive.predictive_probs(model, guide, x, num_samples=n)
    standard_error = (2 * draws.var(0) / n).sqrt()
    assert ((ours - draws.mean(0)).abs() <= 5 * standard_error + 1e-6).all()
    # the posterior is wide here, so the predictive is not the posterior-mean network's
    assert (ours - predictive.posterior_mean_probs(model, guide, x)).abs().max() > 0.05


def test_predictive_probabilities_are_stable_where_softmax_underflows():
    model, guide = _model_and_guide(log_var=-60.0)
    with torch.no_grad():
        guide.layers[-1].weight.loc.mul_(1e3)  # logits of order 1e3: softmax rounds to 0 and 1
    x = torch.randn(20, 5)
    labels = torch.randint(0, 3, (20,))
    logits = pyro_bc.predict_logits(model, guide, x)
    log_p = predictive.predictive_log_probs(model, guide, x, num_samples=2)
    torch.testing.assert_close(log_p, logits.log_softmax(-1), rtol=1e-4, atol=1e-3)
    assert torch.isfinite(log_p).all()
    assert F.cross_entropy(logits, labels).item() > 10  # the labels are random: large NLL


def test_network_metrics_are_those_of_its_softmax():
    network = nn.Sequential(nn.Linear(5, 3))
    loader = _loader()
    result = predictive.network_metrics(network, loader, predictor="compressed")
    x, y = (torch.cat(t) for t in zip(*loader, strict=True))
    with torch.no_grad():
        logits = network(x)
    assert result.n == 40 and result.predictor == "compressed"
    assert result.nll == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert result.entropy == pytest.approx(predictive.entropy(logits.softmax(-1)).mean().item())
    assert result.ece == pytest.approx(
        predictive.expected_calibration_error(logits.softmax(-1), y), abs=1e-7
    )
    assert "compressed: error" in str(result)
    assert result.to_dict()["bin_count"] == result.bin_count.tolist()


def test_compressed_network_is_measured_as_a_point_estimate():
    model, guide = _model_and_guide(log_var=-14.0)
    loader = _loader()
    compressed = pyro_bc.compress(guide, thresholds=10.0, bits=None)
    small = predictive.network_metrics(compressed, loader)
    mean = predictive.posterior_mean_metrics(model, guide, loader)
    # nothing pruned and no quantization: the compressed network is the posterior-mean network
    assert small.nll == pytest.approx(mean.nll, rel=1e-5)
    assert small.error == mean.error


# ---------------------------------------------------------------------------------------------
# Reliability diagram


def test_reliability_diagram_draws_one_curve_per_predictor_and_saves_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (500,), generator=g)
    sharp = torch.nn.functional.one_hot(labels, 4) * 6.0 + torch.randn(500, 4, generator=g) * 3
    dense = predictive.calibration(sharp.softmax(-1), labels, predictor="dense")
    overconfident = (sharp * 4).softmax(-1)
    path = tmp_path / "reliability.png"
    fig = plots.reliability_diagram(
        {"dense predictive": dense, "compressed": (overconfident, labels)}, path=path
    )
    assert isinstance(fig, Figure)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    top = fig.axes[0]
    curves = {line.get_label(): line for line in top.get_lines()}
    compressed = predictive.calibration(overconfident, labels)
    assert set(curves) == {
        "calibrated",
        f"dense predictive (ECE {dense.ece:.4f})",
        f"compressed (ECE {compressed.ece:.4f})",
    }
    line = curves[f"compressed (ECE {compressed.ece:.4f})"]
    filled = compressed.bin_count > 0
    np.testing.assert_allclose(line.get_xdata(), compressed.bin_confidence[filled].numpy())
    np.testing.assert_allclose(line.get_ydata(), compressed.bin_accuracy[filled].numpy())
    # a single result and a list are drawn too; their labels come from the results
    single = plots.reliability_diagram(dense)
    assert "dense (ECE" in single.axes[0].get_legend_handles_labels()[1][1]
    with pytest.raises(TypeError, match="Calibration or a \\(probs, labels\\) pair"):
        plots.reliability_diagram({"bad": 0.3})
