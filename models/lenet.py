"""LeNet-300-100 and LeNet-5-Caffe, the paper's MNIST networks, with deterministic twins."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork


class LeNet300100(BayesianNetwork):
    """784-300-100-10 with ReLUs; groups are the inputs of each dense layer.

    Example::

        model = LeNet300100(prior=GroupNormalJeffreys(), dataset_size=60_000)
        twin = LeNet300100.deterministic()     # same layer names, plain nn.Linear
    """

    def __init__(self, prior=None, dataset_size=None):
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=BayesianLinear(784, 300, prior=prior),
                relu1=nn.ReLU(),
                fc2=BayesianLinear(300, 100, prior=prior),
                relu2=nn.ReLU(),
                fc3=BayesianLinear(100, 10, prior=prior),
            ),
            dataset_size=dataset_size,
            input_shape=(1, 28, 28),
        )

    @staticmethod
    def deterministic() -> nn.Sequential:
        """A plain network of the same shape and layer names, for pretraining and comparison."""
        return nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(784, 300),
                relu1=nn.ReLU(),
                fc2=nn.Linear(300, 100),
                relu2=nn.ReLU(),
                fc3=nn.Linear(100, 10),
            )
        )


class LeNet5Caffe(BayesianNetwork):
    """Caffe's LeNet-5: conv 20 and 50 filters of 5x5 with 2x2 max-pooling, dense 800-500-10.

    Groups are the filters of each convolution and the inputs of each dense layer.

    Example::

        model = LeNet5Caffe(prior=GroupHorseshoe(), dataset_size=60_000)
    """

    def __init__(self, prior=None, dataset_size=None):
        super().__init__(
            OrderedDict(
                conv1=BayesianConv2d(1, 20, 5, prior=prior),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=BayesianConv2d(20, 50, 5, prior=prior),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=BayesianLinear(800, 500, prior=prior),
                relu3=nn.ReLU(),
                fc2=BayesianLinear(500, 10, prior=prior),
            ),
            dataset_size=dataset_size,
            input_shape=(1, 28, 28),
        )

    @staticmethod
    def deterministic() -> nn.Sequential:
        """A plain network of the same shape and layer names, for pretraining and comparison."""
        return nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 20, 5),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(20, 50, 5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(800, 500),
                relu3=nn.ReLU(),
                fc2=nn.Linear(500, 10),
            )
        )
