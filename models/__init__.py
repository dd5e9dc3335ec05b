"""The paper's networks as Pyro models, and their recipes (importable as ``pyro_bc.models``)."""

from .lenet import LeNet5Caffe, LeNet300100
from .recipes import MODELS, PRIORS, RECIPES, Recipe, build, recipe

__all__ = ["MODELS", "PRIORS", "RECIPES", "LeNet300100", "LeNet5Caffe", "Recipe", "build", "recipe"]
