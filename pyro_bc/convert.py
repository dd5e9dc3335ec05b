"""Bring your own network: a trained plain ``nn.Sequential`` as a Bayesian model and its guide.

:func:`bayesianize` swaps every ``nn.Linear`` and ``nn.Conv2d`` for its Bayesian layer (a
``nn.BatchNorm2d`` right after a convolution becomes that layer's batch norm, with the group
scale after it; see :class:`~pyro_bc.nn.BayesianConv2d`), keeps activations, pooling, flatten and
dropout, and starts a :class:`~pyro_bc.StructuredGuide` at the trained weights, so the
posterior-mean network is the trained one. Train it with :func:`pyro_bc.fit` and compress it.

Example::

    model, guide = pyro_bc.bayesianize(trained, dataset_size=50_000, input_shape=(3, 32, 32))
    pyro_bc.fit(model, guide, train_loader, epochs=50)
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn

from .guides import StructuredGuide
from .nn import BayesianConv2d, BayesianLinear, BayesianNetwork

#: Modules copied as they are: they act per channel or per position and have no weights.
KEPT = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
SUPPORTED = (
    "Linear, Conv2d (groups=1, padding_mode='zeros'), BatchNorm2d right after a Conv2d, ReLU, "
    "LeakyReLU, Tanh, MaxPool2d, AvgPool2d, Flatten, Dropout and Identity, in an nn.Sequential "
    "(nested nn.Sequentials are flattened)"
)


def bayesianize(
    network: nn.Sequential,
    prior=None,
    *,
    dataset_size: int | None = None,
    input_shape=None,
    clip_var=None,
    rescale: bool = True,
):
    """Turns a trained plain network into ``(model, guide)`` with the same posterior-mean network.

    :param network: an ``nn.Sequential`` of the modules in :data:`SUPPORTED`. Layers keep their
        names; a module of a nested ``nn.Sequential`` is named by its path with ``_`` for ``.``
        (``features.0`` becomes ``features_0``), and a ``BatchNorm2d`` after a ``Conv2d`` becomes
        the Bayesian conv layer's ``batch_norm`` (the conv's bias is folded into it).
    :param prior: the group prior of every Bayesian layer (default: group normal-Jeffreys).
    :param dataset_size: number of training examples (scales the likelihood of a mini-batch).
    :param input_shape: shape of one input, e.g. ``(3, 32, 32)``, recorded on the model.
    :param clip_var: maximum weight variance, as for :class:`~pyro_bc.StructuredGuide`.
    :param rescale: start each group's scale at its trained weights' root mean square
        (:meth:`StructuredGuide.init_from`).
    :returns: a :class:`~pyro_bc.nn.BayesianNetwork` and its :class:`~pyro_bc.StructuredGuide`,
        on the device of ``network``; in eval mode, the posterior-mean logits equal
        ``network``'s.

    Example::

        trained = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
        model, guide = bayesianize(trained, priors.GroupHorseshoe(), dataset_size=60_000)
    """
    if not isinstance(network, nn.Sequential):
        raise TypeError(
            f"bayesianize: needs an nn.Sequential, got {type(network).__name__}; supported: "
            f"{SUPPORTED}"
        )
    modules = _flatten(network)
    layers, trained = OrderedDict(), OrderedDict()
    position = 0
    while position < len(modules):
        name, module = modules[position]
        following = modules[position + 1] if position + 1 < len(modules) else (None, None)
        trained[name] = module
        if type(module) is nn.Linear:
            layers[name] = BayesianLinear(
                module.in_features, module.out_features, module.bias is not None, prior
            )
        elif type(module) is nn.Conv2d:
            batch_norm = following[1] if isinstance(following[1], nn.BatchNorm2d) else None
            layers[name] = _bayesian_conv(name, module, following[0], batch_norm, prior)
            if batch_norm is not None:
                trained[following[0]] = batch_norm
                position += 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"bayesianize: {type(module).__name__} {name!r} does not directly follow a "
                f"Conv2d; only a BatchNorm2d right after a Conv2d is supported (the group scale "
                f"sits after it); supported: {SUPPORTED}"
            )
        elif type(module) in KEPT:
            layers[name] = copy.deepcopy(module)
        else:
            raise TypeError(
                f"bayesianize: cannot convert module {name!r} of type {type(module).__name__}; "
                f"supported: {SUPPORTED}"
            )
        position += 1

    model = BayesianNetwork(layers, dataset_size=dataset_size, input_shape=input_shape)
    guide = StructuredGuide(model, clip_var=clip_var)
    guide.init_from(nn.Sequential(trained), rescale=rescale)
    parameter = next(network.parameters(), None)
    if parameter is not None:
        model.to(parameter.device)
        guide.to(parameter.device)
    return model, guide


def _flatten(network, prefix=""):
    """``(name, module)`` for every module of nested ``nn.Sequential`` s, in running order."""
    modules = []
    for name, module in network.named_children():
        path = f"{prefix}_{name}" if prefix else name
        if type(module) is nn.Sequential:
            modules.extend(_flatten(module, path))
        else:
            modules.append((path, module))
    names = [name for name, _ in modules]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(
            f"bayesianize: flattening the nested nn.Sequentials names two modules {clashes}; "
            "rename one of them"
        )
    return modules


def _bayesian_conv(name, conv, bn_name, batch_norm, prior):
    if conv.groups != 1:
        raise ValueError(
            f"bayesianize: Conv2d {name!r} is grouped (groups={conv.groups}); a group scale "
            f"prunes a filter over all input channels, so only groups=1 is supported; "
            f"supported: {SUPPORTED}"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"bayesianize: Conv2d {name!r} pads with {conv.padding_mode!r}; only "
            f"padding_mode='zeros' is supported"
        )
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, prior=prior)
    if batch_norm is None:
        return BayesianConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            bias=conv.bias is not None,
            **options,
        )
    if batch_norm.num_features != conv.out_channels or not batch_norm.track_running_stats:
        raise ValueError(
            f"bayesianize: BatchNorm2d {bn_name!r} after Conv2d {name!r} needs "
            f"num_features={conv.out_channels} and running statistics "
            f"(track_running_stats=True); got {batch_norm!r}"
        )
    return BayesianConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        bias=False,
        batch_norm=True,
        bn_eps=batch_norm.eps,
        bn_momentum=batch_norm.momentum,
        **options,
    )
