import json
import math
from collections import OrderedDict

import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc.compression import (
    DEFAULT_THRESHOLD,
    exponent_bits,
    group_masks,
    histogram_valley,
    significand_bits,
    weight_bits,
)
from pyro_bc.fixed_point import dequantize, fixed_point_width, quantize
from pyro_bc.gather import Gather
from pyro_bc.models import LeNet5Caffe, LeNet300100
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork
from pyro_bc.predictive import expected_calibration_error, predictive_metrics
from pyro_bc.priors import GroupHorseshoe

PRUNED_LOG_VAR = 2.0  # log alpha = 2 - log(mu_z^2) >= -3 for mu_z near 1: pruned


def _set_posterior(guide, pruned, seed=0):
    """Random posterior means and small variances; ``pruned = {layer: group indices}``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.copy_(1 + 0.2 * torch.randn(scale.loc.shape, generator=g))
            scale.log_var.fill_(-12.0)
            scale.log_var[list(pruned.get(layer.name, []))] = PRUNED_LOG_VAR
            fan_in = math.prod(layer.weight.loc.shape[1:])
            weight = layer.weight
            weight.loc.copy_(torch.randn(weight.loc.shape, generator=g) / math.sqrt(fan_in))
            weight.log_var.uniform_(-14, -8, generator=g)
            if layer.bias is not None:
                layer.bias.loc.copy_(0.1 * torch.randn(layer.bias.loc.shape, generator=g))
    return guide


@torch.no_grad()
def _zeroed_reference(model, guide, pruned, x):
    """Posterior-mean logits with the scales of the pruned groups set to zero."""
    model.eval()  # dropout off, as in the compressed network
    saved = {}
    for layer in guide.layers:
        (scale,) = layer.scale_factors
        saved[layer.name] = scale.loc.clone()
        scale.loc[list(pruned.get(layer.name, []))] = 0.0
    try:
        return pyro_bc.predict_logits(model, guide, x)
    finally:
        for layer in guide.layers:
            layer.scale_factors[0].loc.copy_(saved[layer.name])


def _custom_chain():
    """Convs with stride, padding and dilation, pooling, a nested block and three activations."""
    return BayesianNetwork(
        OrderedDict(
            conv1=BayesianConv2d(2, 6, 3, padding=1),
            act1=nn.LeakyReLU(0.1),
            pool1=nn.AvgPool2d(2),
            block=pyro.nn.PyroModule[nn.Sequential](
                OrderedDict(conv2=BayesianConv2d(6, 5, 3, stride=2, padding=2, dilation=2))
            ),
            act2=nn.Tanh(),
            pool2=nn.MaxPool2d(2, ceil_mode=True),
            drop=nn.Dropout(0.5),
            flatten=nn.Flatten(),
            fc1=BayesianLinear(5 * 2 * 2, 7),
            act3=nn.ReLU(),
            fc2=BayesianLinear(7, 4, bias=False),
        ),
        input_shape=(2, 12, 12),
    )


def _batch_norm_chain():
    """Convolutions with batch norm (the scale after it) and non-trivial running statistics."""
    model = BayesianNetwork(
        OrderedDict(
            conv1=BayesianConv2d(2, 6, 3, padding=1, bias=False, batch_norm=True),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            conv2=BayesianConv2d(6, 4, 3, bias=False, batch_norm=True),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=BayesianLinear(4 * 2 * 2, 3),
        ),
        input_shape=(2, 8, 8),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            bn = conv.batch_norm
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return model


CASES = {
    "batch norm": (_batch_norm_chain, {"conv1": [1, 4], "conv2": [2], "fc": [0, 5, 6]}),
    "lenet300": (
        LeNet300100,
        {"fc1": range(0, 784, 3), "fc2": [0, 5, 7, 99, 150], "fc3": [1, 2, 50]},
    ),
    "lenet5": (
        LeNet5Caffe,
        {"conv1": [0, 3], "conv2": [1, 4, 9, 49], "fc1": range(100, 800, 7), "fc2": [0, 9]},
    ),
    # block.conv2's filter 1 is kept but its whole 2x2 block of fc1 inputs (4..7) is pruned
    "custom": (
        _custom_chain,
        {"conv1": [2], "block.conv2": [3], "fc1": [0, 4, 5, 6, 7, 17], "fc2": [6]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_thinned_network_equals_posterior_mean_with_pruned_groups_zeroed(case):
    network, pruned = CASES[case]
    model = network()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    compressed = pyro_bc.compress(guide, bits=None)
    x = torch.randn(6, *model.input_shape)
    expected = _zeroed_reference(model, guide, pruned, x)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), expected, rtol=1e-5, atol=1e-5)
    # the thinned network is really smaller
    report = compressed.report
    assert report.weights_kept < report.weights
    for layer in report.layers:
        assert layer.groups_below_threshold == layer.groups - len(pruned[layer.name])


def test_quantized_network_is_close_and_on_its_grid():
    model = LeNet300100()
    pruned = CASES["lenet300"][1]
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    compressed = pyro_bc.compress(guide)
    x = torch.randn(5, 1, 28, 28)
    expected = _zeroed_reference(model, guide, pruned, x)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), expected, rtol=0.05, atol=0.05)
    for name, t in compressed.formats.items():
        scaled = compressed.get_submodule(name).weight.double() * 2.0**t
        assert torch.equal(scaled, scaled.round())
        layer = next(r for r in compressed.report.layers if r.name == name)
        assert layer.frac_bits == t
        assert layer.file_bits == fixed_point_width(scaled.round().long())


def test_pruned_dense_input_removes_the_previous_row_and_bias():
    model = LeNet300100()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"fc2": [3, 10], "fc3": [0]})
    compressed = pyro_bc.compress(guide, bits=None)
    post = guide.distributions()
    fc1_rows = [i for i in range(300) if i not in (3, 10)]
    assert compressed.fc1.weight.shape == (298, 784)
    mean_z = post["fc1.scale"].base_dist.loc
    expected = (post["fc1.weight"].base_dist.loc * mean_z)[fc1_rows]
    torch.testing.assert_close(compressed.fc1.weight, expected)
    torch.testing.assert_close(compressed.fc1.bias, post["fc1.bias"].base_dist.loc[fc1_rows])
    assert compressed.fc2.weight.shape == (99, 298)
    assert compressed.fc3.weight.shape == (10, 99)
    assert not any(isinstance(m, Gather) for m in compressed)  # no pixel was pruned


def test_pruned_filter_removes_next_conv_channel_and_dense_block():
    model = LeNet5Caffe()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"conv1": [4], "conv2": [7, 8]})
    compressed = pyro_bc.compress(guide, bits=None)
    assert compressed.conv1.weight.shape == (19, 1, 5, 5)
    assert compressed.conv2.weight.shape == (48, 19, 5, 5)
    post = guide.distributions()
    mean_z = post["conv2.scale"].base_dist.loc
    filters = [f for f in range(50) if f not in (7, 8)]
    channels = [c for c in range(20) if c != 4]
    expected = post["conv2.weight"].base_dist.loc * mean_z[:, None, None, None]
    torch.testing.assert_close(compressed.conv2.weight, expected[filters][:, channels])
    expected_bias = post["conv2.bias"].base_dist.loc * mean_z  # the scale multiplies the bias
    torch.testing.assert_close(compressed.conv2.bias, expected_bias[filters])
    # filters 7 and 8 own fc1 inputs 7*16..9*16: the blocks go, no Gather is needed
    assert compressed.fc1.weight.shape == (500, 48 * 16)
    assert not any(isinstance(m, Gather) for m in compressed)
    assert compressed.report.architecture == "20-50-800-500 -> 19-48-768-500"


def test_filter_whose_dense_block_is_all_pruned_goes_and_partial_blocks_are_gathered():
    model = LeNet5Caffe()
    block_of_5 = range(5 * 16, 6 * 16)
    pruned = {"fc1": [*block_of_5, 0, 17]}  # all of filter 5's block, parts of filters 0 and 1
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    compressed = pyro_bc.compress(guide, bits=None)
    assert compressed.conv2.weight.shape[0] == 49
    gather = compressed.fc1_gather
    assert (gather.in_features, gather.out_features) == (49 * 16, 49 * 16 - 2)
    assert 0 not in gather.index.tolist() and 17 not in gather.index.tolist()
    assert compressed.report.layers[1].groups_kept == 49
    assert compressed.report.layers[1].groups_below_threshold == 50


def test_pruned_pixels_are_dropped_by_a_gather_in_front():
    model = LeNet300100()
    pixels = [0, 1, 2, 27, 783]
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"fc1": pixels})
    compressed = pyro_bc.compress(guide, bits=None)
    names = [name for name, _ in compressed.named_children()]
    assert names[:3] == ["flatten", "fc1_gather", "fc1"]
    kept = [p for p in range(784) if p not in pixels]
    assert compressed.fc1_gather.index.tolist() == kept
    assert compressed.fc1.in_features == 779


def test_bit_width_rule_against_a_hand_computation():
    # 2 Var < 2^-t:  Var 1e-3 -> t = 1..8 (8 bits); 1e-5 -> 15; 0.3 -> 0; 1e-12 -> all 23
    assert significand_bits(torch.tensor([1e-3])) == 8
    assert significand_bits(torch.tensor([1e-5])) == 15
    assert significand_bits(torch.tensor([0.3])) == 0
    # per weight, the same rule
    assert weight_bits(torch.tensor([1e-3, 1e-5, 0.3])).tolist() == [8, 15, 0]
    assert significand_bits(torch.tensor([1e-12])) == 23
    assert significand_bits(torch.tensor([1e-3, 1e-5])) == 12  # ceil(11.5)
    assert significand_bits(torch.tensor([1e-3, 1e-5, 0.3])) == 8  # ceil(23 / 3)
    # e = ceil(log2(log2 m + 1) + 1), clamped to 1 for m <= 1
    hand = {0.3: 1, 0.5: 1, 0.75: 1, 1.0: 1, 2.0: 2, 3.0: 3, 100.0: 4}
    assert {m: exponent_bits(m) for m in hand} == hand
    q, width = quantize(torch.tensor([0.3, -0.7, 0.125]), 2)
    assert q.tolist() == [1, -3, 1] and width == 3  # round half up; -4..3 fits in 3 bits
    assert dequantize(q, 2).tolist() == [0.25, -0.75, 0.25]
    assert fixed_point_width(torch.tensor([0])) == 1
    assert fixed_point_width(torch.tensor([-1])) == 1
    assert fixed_point_width(torch.tensor([4])) == 4


def test_compress_applies_the_bit_rule_to_the_kept_weights():
    layer = BayesianLinear(2, 2, bias=False)
    model = BayesianNetwork([layer], input_shape=(2,))
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        (scale,) = guide.layers[0].scale_factors
        scale.loc.fill_(1.0)
        scale.log_var.copy_(torch.tensor([-60.0, 5.0]))  # input 1 is pruned
        guide.layers[0].weight.loc.copy_(torch.tensor([[0.5, 9.0], [-0.25, 9.0]]))
        # Var[w] = sigma^2 (E[z] = 1, Var[z] ~ 1e-26): kept weights 1e-3 and 1e-5 -> t = 12
        variances = torch.tensor([[1e-3, 0.5], [1e-5, 0.5]])
        guide.layers[0].weight.log_var.copy_(variances.log())
    report = pyro_bc.compress(guide).report
    (fc,) = report.layers
    assert (fc.frac_bits, report.exponent_bits, fc.paper_bits) == (12, 1, 14)
    assert fc.weights_kept == 2
    # 0.5 and -0.25 at 12 fraction bits: 2048 and -1024 need 13 bits in two's complement
    assert fc.file_bits == 13


def _tiny_model():
    return BayesianNetwork(
        OrderedDict(
            fc1=BayesianLinear(4, 3),
            relu=nn.ReLU(),
            fc2=BayesianLinear(3, 2),
        ),
        input_shape=(4,),
    )


def test_accounting_against_a_hand_computation():
    model = _tiny_model()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"fc1": [0], "fc2": [1]})
    with torch.no_grad():
        guide.layers[0].scale_factors[0].loc.fill_(1.0)
        guide.layers[0].weight.loc[0, 1] = 3.0  # max |E[w]| = 3 -> e = ceil(log2(2.58) + 1) = 3
    compressed = pyro_bc.compress(guide, bits={"fc1": 4, "fc2": 6})
    report = compressed.report
    fc1, fc2 = report.layers
    # fc1 keeps inputs 1..3 and outputs 0 and 2 (fc2 prunes its input 1): 2 x 3; fc2: 2 x 2
    assert (fc1.kept_shape, fc2.kept_shape) == ((2, 3), (2, 2))
    assert (fc1.groups_kept, fc2.groups_kept) == (3, 2)
    assert report.architecture == "4-3 -> 3-2"
    assert (report.weights, report.weights_kept) == (18, 10)
    assert report.pruning_rate == pytest.approx(1.8)
    assert report.exponent_bits == 3
    assert (fc1.paper_bits, fc2.paper_bits) == (8, 10)  # 1 + e + t
    assert report.paper_bits_total == 6 * 8 + 4 * 10
    assert report.precision_rate == pytest.approx(32 * 18 / 88)
    assert (report.macs, report.macs_kept) == (18, 10)
    assert (fc1.biases, fc1.biases_kept, fc2.biases_kept) == (3, 2, 2)
    assert report.original_bytes == 4 * (18 + 3 + 2)
    assert report.file_bytes == len(compressed.to_bytes()) == sum(report.file_layout.values())
    assert report.file_layout["biases"] == 4 * 4
    weight_bytes = math.ceil(6 * fc1.file_bits / 8) + math.ceil(4 * fc2.file_bits / 8)
    assert report.file_layout["weights"] == weight_bytes
    assert report.file_rate == pytest.approx(report.original_bytes / report.file_bytes)


def test_conv_multiply_adds_count_output_positions():
    model = LeNet5Caffe()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"conv1": [0]})
    report = pyro_bc.compress(guide, bits=None).report
    conv1, conv2 = report.layers[:2]
    assert conv1.macs == 20 * 24 * 24 * 25 and conv1.macs_kept == 19 * 24 * 24 * 25
    assert conv2.macs == 50 * 20 * 8 * 8 * 25 and conv2.macs_kept == 50 * 19 * 8 * 8 * 25
    assert (conv1.paper_bits, conv1.file_bits) == (32, 32)


def test_report_states_the_error_of_the_compressed_network(monkeypatch):
    model = LeNet300100()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), CASES["lenet300"][1])
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=32)
    dense = []

    def recorded(*args, **kwargs):
        dense.append((args, kwargs, predictive_metrics(*args, **kwargs)))
        return dense[-1][2]

    monkeypatch.setattr("pyro_bc.compression.pipeline.predictive_metrics", recorded)
    compressed = pyro_bc.compress(guide, test_loader=loader)
    report = compressed.report
    assert report.test_examples == 64
    assert report.test_error == compressed.evaluate(loader)["error"]
    assert report.dense_test_error == pyro_bc.evaluate(model, guide, loader)["error"]
    # calibration before and after: the compressed network's NLL is its cross-entropy
    with torch.no_grad():
        cross_entropy = sum(
            torch.nn.functional.cross_entropy(compressed(x), y, reduction="sum").item()
            for x, y in loader
        )
    assert report.test_nll == pytest.approx(cross_entropy / 64, rel=1e-4)
    with torch.no_grad():
        probs = torch.cat([compressed(x).softmax(-1) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert report.test_ece == pytest.approx(expected_calibration_error(probs, labels), rel=1e-5)
    # the dense figures are those of the posterior predictive of this model and guide
    ((args, kwargs, metrics),) = dense
    assert args[:3] == (model, guide, loader) and kwargs == {"num_samples": 10}
    assert (report.dense_test_nll, report.dense_test_ece) == (metrics.nll, metrics.ece)
    assert report.predictive_samples == 10
    assert "calibration" in str(report)
    text = str(report)
    assert "784-300-100 -> " in text and "test error" in text and "after precision" in text
    summary = json.loads(report.to_json())
    assert summary["architecture"] == report.architecture
    assert summary["layers"][0]["name"] == "fc1"
    assert summary["precision_rate"] == pytest.approx(report.precision_rate)


def _no_constant(name):
    raise AssertionError(f"{name} is not JSON")


def test_thresholds_number_dict_and_default():
    model = LeNet300100()
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.fill_(1.0)
            scale.log_var.copy_(torch.linspace(-8, 2, scale.log_var.numel()))
    default = pyro_bc.compress(guide, bits=None).report.layers[2]
    # one mode (a uniform spread): the valley rule falls back to the authors' -3
    assert default.threshold == DEFAULT_THRESHOLD
    assert default.threshold_rule == "auto: one mode, default"
    assert default.groups_below_threshold == 50  # linspace(-8, 2, 100) < -3: the first half
    report = pyro_bc.compress(guide, {"fc3": -5.0}, bits=None).report
    assert [layer.threshold for layer in report.layers] == [-3.0, -3.0, -5.0]
    assert report.layers[2].groups_below_threshold == 30
    everything = pyro_bc.compress(guide, 10.0, bits=None).report
    assert everything.architecture == "784-300-100 -> 784-300-100"
    keep_fc3 = pyro_bc.compress(guide, {"fc3": math.inf}, bits=None).report
    assert keep_fc3.layers[2].groups_kept == 100
    # strict JSON has no infinity: a threshold that keeps every group is written as null
    summary = json.loads(keep_fc3.to_json(), parse_constant=_no_constant)
    assert [layer["threshold"] for layer in summary["layers"]] == [-3.0, -3.0, None]
    with pytest.raises(ValueError, match="fc9"):
        pyro_bc.compress(guide, {"fc9": -3})
    with pytest.raises(ValueError, match="fc1"):
        pyro_bc.compress(guide, {"fc1": "valley"})


def test_auto_threshold_finds_the_valley_between_two_modes():
    g = torch.Generator().manual_seed(0)
    kept = -8 + 0.7 * torch.randn(600, generator=g)
    pruned = 3 + 1.5 * torch.randn(200, generator=g)
    valley = histogram_valley(torch.cat([kept, pruned, torch.tensor([math.inf])]))
    assert -5.5 < valley < 0.5
    assert histogram_valley(torch.randn(500, generator=g)) is None  # one mode
    # two bumps closer than MIN_MODE_SEPARATION (early training) are not kept and pruned modes
    close = torch.cat([-8 + 0.3 * torch.randn(300, generator=g), -6 + 0.3 * torch.randn(300)])
    assert histogram_valley(close) is None
    assert histogram_valley(close, min_separation=1.0) is not None
    model = LeNet300100()
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        (scale,) = guide.layers[0].scale_factors
        scale.loc.fill_(1.0)
        scale.log_var.copy_(torch.cat([kept[:584], pruned]))
    report = pyro_bc.compress(guide, "auto", bits=None).report
    fc1 = report.layers[0]
    assert fc1.threshold_rule == "auto" and fc1.groups_kept == 584
    assert report.layers[1].threshold_rule == "auto: one mode, default"


def test_custom_prior_is_compressed_through_its_moments():
    def half_cauchy_groups(name, num_groups):
        import pyro.distributions as dist

        tau = pyro.sample(f"{name}.tau", dist.HalfCauchy(1.0))
        lam = pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))
        return tau * lam

    model = BayesianNetwork(
        OrderedDict(fc1=BayesianLinear(6, 4, prior=half_cauchy_groups), relu=nn.ReLU()),
        input_shape=(6,),
    )
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        guide.layers[0].scale_factors[1].log_var[[1, 4]] = 3.0  # wide log-normal: pruned
    compressed = pyro_bc.compress(guide, bits=None)
    assert compressed.report.layers[0].groups_kept == 4
    assert compressed.fc1_gather.index.tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize(
    "modules, match",
    [
        ([BayesianLinear(4, 3), nn.Sigmoid(), BayesianLinear(3, 2)], "Sigmoid"),
        ([BayesianConv2d(1, 4, 3, groups=1), BayesianConv2d(4, 4, 3, groups=2)], "groups=2"),
        ([BayesianConv2d(1, 4, 3), BayesianLinear(10, 2)], "Flatten"),
        ([nn.Flatten(0), BayesianLinear(4, 2)], "Flatten"),
    ],
)
def test_unsupported_models_raise_a_clear_error(modules, match):
    model = BayesianNetwork(modules, input_shape=(1, 12, 12) if match != "Sigmoid" else (4,))
    guide = pyro_bc.StructuredGuide(model)
    with pytest.raises(ValueError, match=match):
        pyro_bc.compress(guide)


def test_non_chain_model_and_whole_layer_pruning_raise():
    class Branching(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.a = BayesianLinear(3, 2)

        def forward(self, x):
            return self.a(x) + self.a(x)

    with pytest.raises(ValueError, match="called more than once"):
        pyro_bc.compress(pyro_bc.StructuredGuide(Branching()))
    model = _tiny_model()
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"fc2": [0, 1, 2]})
    with pytest.raises(ValueError, match="'fc2'"):
        pyro_bc.compress(guide)


def test_a_single_layer_and_compress_is_deterministic():
    layer = BayesianLinear(5, 3)
    guide = _set_posterior(pyro_bc.StructuredGuide(layer), {"BayesianLinear": [2]})
    first, second = pyro_bc.compress(guide), pyro_bc.compress(guide)
    assert first.to_bytes() == second.to_bytes()
    x = torch.randn(4, 5)
    assert torch.equal(first(x), second(x))
    assert first.report.architecture == "5 -> 4"


def test_horseshoe_guides_compress_through_their_moments():

    model = BayesianNetwork(
        OrderedDict(
            conv=BayesianConv2d(1, 3, 3, prior=GroupHorseshoe()),
            relu=nn.ReLU(),
            flatten=nn.Flatten(),
            fc=BayesianLinear(3 * 4 * 4, 2, prior=GroupHorseshoe()),
        ),
        input_shape=(1, 6, 6),
    )
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for layer in guide.layers:
            for factor in layer.scale_factors:
                factor.loc.add_(0.3 * torch.randn(factor.loc.shape))
        x = torch.randn(4, 1, 6, 6)
        dense = pyro_bc.compress(guide, math.inf, bits=None)
        torch.testing.assert_close(dense(x), pyro_bc.predict_logits(model, guide, x))
        local_a = {f.site: f for layer in guide.layers for f in layer.scale_factors}
        local_a["conv.local_a"].log_var[1] = 3.0  # log alpha = log(expm1(var of log z)) > 0
        local_a["fc.local_a"].log_var[:5] = 3.0
    report = pyro_bc.compress(guide).report
    assert report.architecture == "3-48 -> 2-27"  # filter 1's block of 16 inputs goes too


def _loader(x):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=7)


def test_calibration_replaces_constant_pruned_pixels_by_their_value():
    model = LeNet300100()
    pixels = [0, 1, 2, 27, 400, 783]
    guide = _set_posterior(pyro_bc.StructuredGuide(model), {"fc1": pixels})
    constants = torch.linspace(-1, 1, len(pixels))

    def images(n):
        x = torch.randn(n, 1, 28, 28)
        x.view(n, -1)[:, pixels] = constants
        return x

    compressed = pyro_bc.compress(guide, bits=None, calibration=_loader(images(20)))
    assert compressed.report.calibration_examples == 20
    assert "calibration examples" in str(compressed.report)
    x = images(5)
    with torch.no_grad():
        dense = pyro_bc.predict_logits(model, guide, x)
        torch.testing.assert_close(compressed(x), dense, rtol=1e-5, atol=1e-5)
        uncalibrated = pyro_bc.compress(guide, bits=None)(x)
    assert (uncalibrated - dense).abs().max() > 1e-2


def test_calibration_folds_constant_pruned_filters_and_units_into_the_next_bias():
    model = LeNet5Caffe()
    pruned = {"conv1": [2], "fc2": [3]}
    guide = _set_posterior(pyro_bc.StructuredGuide(model), pruned)
    with torch.no_grad():  # constant outputs: a filter and a unit that ignore their inputs
        layers = {layer.name: layer for layer in guide.layers}
        layers["conv1"].weight.loc[2] = 0.0
        layers["conv1"].bias.loc[2] = 0.5
        layers["fc1"].weight.loc[3] = 0.0
        layers["fc1"].bias.loc[3] = 0.7
    compressed = pyro_bc.compress(guide, bits=None, calibration=_loader(torch.randn(14, 1, 28, 28)))
    assert compressed.conv2.in_channels == 19 and compressed.fc2.in_features == 499
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        dense = pyro_bc.predict_logits(model, guide, x)
        torch.testing.assert_close(compressed(x), dense, rtol=1e-5, atol=1e-5)
        assert (pyro_bc.compress(guide, bits=None)(x) - dense).abs().max() > 1e-2


def test_calibration_needs_examples():
    guide = _set_posterior(pyro_bc.StructuredGuide(LeNet300100()), {"fc1": [0]})
    with pytest.raises(ValueError, match="calibration loader yielded no examples"):
        pyro_bc.compress(guide, calibration=[])


def test_auto_threshold_uses_the_priors_mode_separation():

    model = BayesianNetwork(
        OrderedDict(fc=BayesianLinear(300, 2, prior=GroupHorseshoe())), input_shape=(300,)
    )
    guide = pyro_bc.StructuredGuide(model)
    g = torch.Generator().manual_seed(0)
    # kept groups near log alpha -4, pruned near -0.7: modes 3.3 apart, as the horseshoe gives
    log_alpha = torch.cat([-4 + 0.4 * torch.randn(200, generator=g), -0.7 + 0.1 * torch.rand(100)])
    with torch.no_grad():
        factors = {f.site.rsplit(".", 1)[-1]: f for f in guide.layers[0].scale_factors}
        for factor in factors.values():
            factor.log_var.fill_(-20.0)
        # log alpha = log(expm1(V)), V = (sum of the four log-variances) / 4
        factors["local_a"].log_var.copy_((4 * log_alpha.exp().log1p()).log())
    masks = group_masks(guide, "auto")["fc"]
    torch.testing.assert_close(masks.log_alpha, log_alpha, rtol=1e-4, atol=1e-4)
    assert masks.threshold_rule == "auto" and -2.8 < masks.threshold < -0.7
    assert masks.groups_kept.sum() == 200
    # the normal-Jeffreys prior's separation reads the same histogram as one mode
    assert histogram_valley(log_alpha) is None
