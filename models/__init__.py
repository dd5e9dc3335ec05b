"""The paper's networks as Pyro models (importable as ``pyro_bc.models``)."""

from .lenet import LeNet5Caffe, LeNet300100
from .vgg import VGG16

__all__ = ["VGG16", "LeNet300100", "LeNet5Caffe"]
