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
