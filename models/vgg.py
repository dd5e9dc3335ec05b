"""VGG-16 with batch norm for 32x32 CIFAR-10 images, the paper's CIFAR-10 network, with its twin.

The layout is that of ``models/vgg_bn_drop.lua`` in Sergey Zagoruyko's cifar.torch (2015), the
"VGG-like" network with batch norm the paper trains on CIFAR-10: thirteen 3x3 convolutions
(stride 1, padding 1), each followed by batch norm (eps 1e-3) and a ReLU, with channels
64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M (M: 2x2 max
pooling, so 32x32 inputs end at 1x1), then a 512-512 dense layer, a ReLU and a 512-10 dense layer.
What we changed, and why:

- The classifier has no ``BatchNorm1d`` after its first dense layer: pyro_bc puts batch norm
  inside conv layers only, where the group scale can sit after it; a dense layer's groups are
  its inputs.
- No dropout in the Bayesian network: the group scales' multiplicative noise regularises it,
  as in the paper's networks. The twin keeps cifar.torch's dropout for pretraining (after the
  ReLU of every convolution but the last of each block: 0.3 after the first, 0.4 elsewhere; 0.5
  before each dense layer); at inference dropout is the identity, which :func:`pyro_bc.compress`
  leaves out.
- The convolutions have no bias: batch norm cancels it.

The pruned architecture the paper reports lists fifteen numbers, one per layer's groups: the
filters of the thirteen convolutions and the inputs of the two dense layers.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork

#: channels of the convolutions in units of ``width`` (64 in the paper); "M" is 2x2 max pooling
LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")
#: batch norm's epsilon in cifar.torch
BN_EPS = 1e-3


def _layers(width, conv, dropout: bool):
    """The layers in running order; ``conv(index, in, out)`` gives a convolution's modules."""
    layers = OrderedDict()
    channels, index, pool = 3, 0, 0
    for position, item in enumerate(LAYOUT):
        if item == "M":
            pool += 1
            layers[f"pool{pool}"] = nn.MaxPool2d(2)
            continue
        index += 1
        out = item * width
        layers.update(conv(index, channels, out))
        layers[f"relu{index}"] = nn.ReLU()
        if dropout and LAYOUT[position + 1] != "M":
            layers[f"drop{index}"] = nn.Dropout(0.3 if index == 1 else 0.4)
        channels = out
    layers["flatten"] = nn.Flatten()
    return layers, channels


class VGG16(BayesianNetwork):
    """The paper's VGG-16 for CIFAR-10 (see the module's docstring for the layout and sources).

    Layers ``conv1`` ... ``conv13`` (:class:`~pyro_bc.nn.BayesianConv2d` with batch norm, one
    group per filter), ``relu1`` ... ``relu13``, ``pool1`` ... ``pool5``, ``flatten``, ``fc1``,
    ``relu14``, ``fc2`` (:class:`~pyro_bc.nn.BayesianLinear`, one group per input).

    :param width: channels of the first block (64 in the paper); the others are 2x, 4x and 8x
        it, and the dense layers are ``8 width`` wide. Small widths make quick tests.

    Example::

        model = VGG16(prior=GroupNormalJeffreys(), dataset_size=50_000)
        twin = VGG16.deterministic()     # same layer names, plain modules, for pretraining
    """

    def __init__(self, prior=None, dataset_size=None, width: int = 64):
        def conv(index, in_channels, out_channels):
            layer = BayesianConv2d(
                in_channels,
                out_channels,
                3,
                padding=1,
                bias=False,
                prior=prior,
                batch_norm=True,
                bn_eps=BN_EPS,
            )
            return {f"conv{index}": layer}

        layers, channels = _layers(_check_width(width), conv, dropout=False)
        layers["fc1"] = BayesianLinear(channels, channels, prior=prior)
        layers["relu14"] = nn.ReLU()
        layers["fc2"] = BayesianLinear(channels, 10, prior=prior)
        super().__init__(layers, dataset_size=dataset_size, input_shape=(3, 32, 32))
        self.width = width

    @staticmethod
    def deterministic(width: int = 64, dropout: bool = True) -> nn.Sequential:
        """A plain network with the same layer names for pretraining: ``conv<i>`` is an
        ``nn.Conv2d`` followed by ``bn<i>``, an ``nn.BatchNorm2d`` (what
        :meth:`StructuredGuide.init_from` reads into ``conv<i>``'s batch norm), and, with
        ``dropout``, cifar.torch's dropout layers ``drop<i>``.

        Example::

            twin = pretrain(VGG16.deterministic(), train_loader, epochs=100)
            guide.init_from(twin, rescale=True)
        """

        def conv(index, in_channels, out_channels):
            return {
                f"conv{index}": nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                f"bn{index}": nn.BatchNorm2d(out_channels, eps=BN_EPS),
            }

        layers, channels = _layers(_check_width(width), conv, dropout)
        if dropout:
            layers["drop_fc1"] = nn.Dropout(0.5)
        layers["fc1"] = nn.Linear(channels, channels)
        layers["relu14"] = nn.ReLU()
        if dropout:
            layers["drop_fc2"] = nn.Dropout(0.5)
        layers["fc2"] = nn.Linear(channels, 10)
        return nn.Sequential(layers)


def _check_width(width):
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(
            f"VGG16: width must be a positive integer (64 in the paper), got {width!r}"
        )
    return width
