import pyro
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

import pyro_bc
from pyro_bc import priors
from pyro_bc.infer import predict_logits
from pyro_bc.models import VGG16
from pyro_bc.nn import BayesianConv2d, BayesianLinear


def test_vgg16_has_the_cifar_torch_layout():
    model = VGG16()  # a model holds no weights, only batch norms: cheap at full width
    convs = [m for m in model.bayesian_layers() if isinstance(m, BayesianConv2d)]
    dense = [m for m in model.bayesian_layers() if isinstance(m, BayesianLinear)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert all(c.batch_norm is not None and not c.has_bias for c in convs)
    assert [(d.in_features, d.out_features) for d in dense] == [(512, 512), (512, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 5
    assert model.input_shape == (3, 32, 32)
    twin = VGG16.deterministic()
    twin_convs = [m for m in twin if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in twin_convs] == [c.out_channels for c in convs]
    # cifar.torch's dropout: after every conv but the last of its block, and before fc1, fc2
    assert [name for name, m in twin.named_children() if isinstance(m, nn.Dropout)] == [
        "drop1", "drop3", "drop5", "drop6", "drop8", "drop9", "drop11", "drop12",
        "drop_fc1", "drop_fc2",
    ]  # fmt: skip
    layer_names = {name for name, m in model.named_children()}
    assert layer_names <= {name for name, m in twin.named_children()}


def test_vgg16_rejects_a_bad_width():
    with pytest.raises(ValueError, match="width must be a positive integer"):
        VGG16(width=0)


@pytest.mark.parametrize("prior", [priors.GroupNormalJeffreys(), priors.GroupHorseshoe()], ids=repr)
def test_vgg16_twin_init_from_and_one_svi_step(prior):
    width = 2
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    twin = VGG16.deterministic(width=width)
    with torch.no_grad():  # running statistics of a "pretrained" twin
        for _ in range(3):
            twin(torch.rand(6, 3, 32, 32))
        for module in twin.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-0.5, 0.5)
    twin.eval()

    model = VGG16(prior=prior, dataset_size=50_000, width=width)
    guide = pyro_bc.StructuredGuide(model).init_from(twin, rescale=True)
    model.eval()
    with torch.no_grad():
        logits = predict_logits(model, guide, x)
        expected = twin(x)
    assert logits.shape == (6, 10)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)

    model.train()
    bn = model.conv1.batch_norm
    before = bn.weight.detach().clone()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    with pyro_bc.poutine.local_reparameterization():
        loss = svi.step(x, y)
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(bn.weight.detach(), before)
    sampled = predict_logits(model, guide, x, mode="sample")
    assert sampled.shape == (6, 10) and torch.isfinite(sampled).all()


def _vgg16_posterior(width, pruned):
    """A tiny VGG-16 with non-trivial batch norms and a random posterior whose groups in
    ``pruned = {layer: indices}`` have log alpha near 2 (pruned at -3), the others near -12."""
    g = torch.Generator().manual_seed(5)
    model = VGG16(prior=priors.GroupNormalJeffreys(), dataset_size=50_000, width=width)
    guide = pyro_bc.StructuredGuide(model)
    with torch.no_grad():
        for module in model.children():
            if isinstance(module, BayesianConv2d):
                bn = module.batch_norm
                n = bn.num_features
                bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(0.3 * torch.randn(n, generator=g))
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.copy_(1 + 0.2 * torch.randn(scale.loc.shape, generator=g))
            scale.log_var.fill_(-12.0)
            scale.log_var[list(pruned.get(layer.name, []))] = 2.0
            fan_in = layer.weight.loc[0].numel()
            layer.weight.loc.copy_(torch.randn(layer.weight.loc.shape, generator=g) / fan_in**0.5)
            layer.weight.log_var.uniform_(-14, -8, generator=g)
            if layer.bias is not None:
                layer.bias.loc.copy_(0.1 * torch.randn(layer.bias.loc.shape, generator=g))
    return model.eval(), guide


@torch.no_grad()
def test_vgg16_compresses_to_its_posterior_mean_network_with_batch_norm_folded(tmp_path):
    width = 2
    x = torch.randn(5, 3, 32, 32)
    model, guide = _vgg16_posterior(width, {})
    expected = predict_logits(model, guide, x)
    compressed = pyro_bc.compress(guide, thresholds=-3, bits=None)
    # batch norm is folded into each thinned convolution: none is left to run
    assert not any(isinstance(m, nn.BatchNorm2d) for m in compressed.modules())
    assert compressed.report.weights_kept == compressed.report.weights
    torch.testing.assert_close(compressed(x), expected, rtol=1e-4, atol=1e-5)

    # pruned filters (the first and last convolution, one in the middle) and dense inputs: the
    # network is the posterior mean with those groups' scales set to zero, and really thinner
    pruned = {"conv1": [0], "conv7": [1, 5], "conv13": [3, 4, 9], "fc1": [0, 2, 3, 15]}
    model, guide = _vgg16_posterior(width, pruned)
    compressed = pyro_bc.compress(guide, thresholds=-3, bits=None)
    for layer in guide.layers:
        layer.scale_factors[0].loc[list(pruned.get(layer.name, []))] = 0.0
    expected = predict_logits(model, guide, x)
    torch.testing.assert_close(compressed(x), expected, rtol=1e-4, atol=1e-5)
    kept = {layer.name: layer.groups_kept for layer in compressed.report.layers}
    assert kept["conv1"] == 1 and kept["conv7"] == 6
    # at 1x1, conv13's filters are fc1's inputs: one goes wherever either side prunes it
    assert kept["conv13"] == kept["fc1"] == 16 - len({3, 4, 9} | {0, 2, 3, 15})

    # quantized to the paper's bit widths, saved and loaded: the same network, close to the mean
    quantized = pyro_bc.compress(guide, thresholds=-3)
    quantized.save(tmp_path / "vgg16.bc")
    loaded = pyro_bc.load(tmp_path / "vgg16.bc")
    torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)
    torch.testing.assert_close(quantized(x), expected, rtol=0, atol=1e-3)
