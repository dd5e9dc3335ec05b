"""The paper's networks as Pyro models (importable as ``pyro_bc.models``)."""

from .lenet import LeNet5Caffe, LeNet300100

__all__ = ["LeNet300100", "LeNet5Caffe"]
