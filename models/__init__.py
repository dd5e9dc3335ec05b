"""The paper's networks as Pyro models, and their recipes (importable as ``pyro_bc.models``)."""

from .lenet import LeNet5Caffe, LeNet300100
from .recipes import MODELS, PRIORS, RECIPES, SUBSET_RECIPES, Recipe, build, recipe
from .vgg import VGG16

__all__ = [
    "MODELS",
    "PRIORS",
    "RECIPES",
    "SUBSET_RECIPES",
    "VGG16",
    "LeNet300100",
    "LeNet5Caffe",
    "Recipe",
    "build",
    "recipe",
]
