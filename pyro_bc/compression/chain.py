"""The chain of modules that compression thins, proved from a traced forward pass.

Compression removes units between consecutive layers, so it must know what the model's
``forward`` really computes, not the order its modules were registered in. :func:`trace_chain`
runs the model once under the guide's posterior means with a hook on every leaf module and
accepts only a chain: each module called once, each taking exactly the previous module's output,
the first taking the model's input and the last giving its output. Anything else - a skip
connection, two layers summed, a layer used twice, a function applied between modules - is
refused with the module's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..gather import Gather
from ..infer import predict_logits
from ..nn import BayesianLayer

#: Modules that may sit between Bayesian layers: they act per channel and map 0 to 0.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh)
POOLING = (nn.MaxPool2d, nn.AvgPool2d)
#: Modules that keep some of the features of a flat input (a thinned posterior has them).
SELECTION = (Gather,)
#: Modules that are the identity at inference; the compressed network leaves them out.
DROPPED = (nn.Identity, nn.Dropout)
SUPPORTED = (
    "Bayesian layers of pyro_bc.nn (convolutions with groups=1), ReLU, LeakyReLU, Tanh, "
    "MaxPool2d, AvgPool2d, Flatten (start_dim=1, end_dim=-1), Gather, Identity and Dropout, called "
    "one after the other, each on the previous one's output"
)


@dataclass
class Link:
    """One module of the chain: its name, the module and its per-example input and output shapes.

    Example::

        link = trace_chain(guide)[0]
        link.name, link.input_shape, link.output_shape  # ('flatten', (1, 28, 28), (784,))
    """

    name: str
    module: nn.Module
    input_shape: tuple
    output_shape: tuple


class _Calls:
    """Forward hooks on the leaf modules that record each call's input and output."""

    def __init__(self, model):
        self.calls = []
        self.handles = []
        self.names = {}
        for name, module in _leaves(model):
            self.names[module] = name
            self.handles.append(module.register_forward_hook(self._record))

    def _record(self, module, args, output):
        self.calls.append((self.names[module], module, args, output))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _leaves(model):
    """Modules without children, and Bayesian layers (whose children are their own business)."""
    inside = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, BayesianLayer):
            inside.add(name)
            yield name or module.site(), module
        elif not any(True for _ in module.children()):
            yield name or type(module).__name__, module


def input_shape_of(model, input_shape=None) -> tuple:
    """The shape of one example: ``input_shape``, else ``model.input_shape``, else the first dense
    layer's input features.

    Example::

        input_shape_of(LeNet5Caffe())  # (1, 28, 28)
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        first = next((m for _, m in _leaves(model) if isinstance(m, BayesianLayer)), None)
        if first is None or first.kind != "dense":
            raise ValueError(
                "compress: the model has no input_shape and does not start with a dense layer; "
                "pass input_shape=(channels, height, width)"
            )
        input_shape = (first.in_features,)
    return tuple(int(s) for s in input_shape)


@torch.no_grad()
def trace_chain(guide, input_shape=None) -> list[Link]:
    """The model's modules in the order its forward pass runs them, proved to form a chain.

    :raises ValueError: naming the module, for anything compression cannot thin: a module not
        called on the previous module's output (skip connections, sums, functions between
        modules), a module called twice, a Bayesian layer the forward pass never runs, or a
        module type that is not supported.

    Example::

        [link.name for link in trace_chain(guide)]  # ['flatten', 'fc1', 'relu1', ...]
    """
    model = guide.model
    shape = input_shape_of(model, input_shape)
    device = next((p.device for p in guide.parameters()), torch.device("cpu"))
    x = torch.randn(2, *shape, device=device)
    was_training = model.training
    model.eval()
    output = failure = None
    try:
        with _Calls(model) as recorder:
            output = predict_logits(model, guide, x)
    except (RuntimeError, ValueError) as e:
        failure = e  # reported after the modules that did run are checked
    finally:
        model.train(was_training)
    chain, seen, previous = [], set(), x
    for name, module, args, out in recorder.calls:
        if module in seen:
            raise ValueError(
                f"compress: module {name!r} is called more than once in the model's forward "
                f"pass; compression thins chains only ({SUPPORTED})"
            )
        seen.add(module)
        if not args or args[0] is not previous:
            raise ValueError(
                f"compress: module {name!r} does not take the previous module's output as its "
                "input (a skip connection, a sum of layers or a function between modules?); "
                f"compression thins chains only ({SUPPORTED})"
            )
        link = Link(name, module, tuple(args[0].shape[1:]), tuple(out.shape[1:]))
        _check_supported(link)
        chain.append(link)
        previous = out
    if failure is not None:
        raise ValueError(
            f"compress: the model's forward pass fails on inputs of shape {shape} "
            f"(input_shape): {failure}"
        ) from None
    if output is not previous:
        last = chain[-1].name if chain else "the input"
        raise ValueError(
            f"compress: the model's output is not the output of its last module ({last!r}); "
            f"compression thins chains only ({SUPPORTED})"
        )
    unused = [m.site() for _, m in _leaves(model) if isinstance(m, BayesianLayer) and m not in seen]
    if unused:
        raise ValueError(f"compress: the forward pass never runs the Bayesian layers {unused}")
    if not any(isinstance(link.module, BayesianLayer) for link in chain):
        raise ValueError(f"compress: {type(model).__name__} has no pyro_bc Bayesian layers")
    return chain


def _check_supported(link):
    name, module, shape = link.name, link.module, link.input_shape
    if isinstance(module, BayesianLayer):
        module.check_thinnable()
        if module.kind == "dense" and len(shape) != 1:
            raise ValueError(
                f"compress: dense layer {name!r} gets inputs of shape {shape}; compress needs "
                "them flattened: put nn.Flatten() before it"
            )
        if module.kind == "conv" and len(shape) != 3:
            raise ValueError(
                f"compress: convolution {name!r} gets inputs of shape {shape}; it needs "
                "(channels, height, width)"
            )
    elif isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(
                f"compress: {name!r} is Flatten(start_dim={module.start_dim}, "
                f"end_dim={module.end_dim}); only Flatten(1, -1) is supported"
            )
    elif isinstance(module, nn.MaxPool2d) and module.return_indices:
        raise ValueError(f"compress: {name!r} is MaxPool2d(return_indices=True); not supported")
    elif isinstance(module, SELECTION) and len(shape) != 1:
        raise ValueError(
            f"compress: {name!r} is a Gather on inputs of shape {shape}; it must follow a Flatten"
        )
    elif not isinstance(module, ELEMENTWISE + POOLING + SELECTION + DROPPED):
        raise ValueError(
            f"compress: module {name!r} is a {type(module).__name__}, which compress cannot "
            f"carry through a thinned network; supported: {SUPPORTED}"
        )
