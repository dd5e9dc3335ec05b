"""Bayesian layers whose forward pass is a Pyro model.

Each layer draws a group scale ``z`` from its prior (dense: one per input feature; conv: one per
output channel), standard-normal weights ``theta`` and, optionally, a bias, and returns the output
of the layer with weights ``w = z * theta``. The output goes through the effectful operation
:func:`preactivation`, so handlers in :mod:`pyro_bc.poutine` can compute it from the guide's
distributions instead (local reparameterization, posterior means) without changing the model.
"""

from __future__ import annotations

from collections import OrderedDict

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.runtime import effectful
from torch import nn

from .distributions import StandardNormal
from .priors import GroupNormalJeffreys, as_prior

#: the role a guide marks its weight and bias sites with (``infer={"bc_role": ...}``): layers
#: compute their outputs from these sites' distributions under :mod:`pyro_bc.poutine`
WEIGHT_ROLE = "weight"
#: the role of group-scale sites whose KL has a closed form: under :mod:`pyro_bc.poutine` layers
#: draw their scales from these sites' distributions and the ELBO needs no value, so the guide
#: puts the placeholder ``infer["bc_placeholder"]`` there instead of a draw
SCALE_ROLE = "scale"


class BayesianLayer(PyroModule):
    """Base class of layers with a group-scale prior and non-centred weights ``w = z * theta``.

    Subclasses define :meth:`apply` (the output for given weights) and :meth:`moments` (mean and
    variance of the output under a factorised Normal posterior of the weights).
    """

    #: which side of the weight matrix the groups index: "input" (dense) or "output" (conv)
    group_side: str

    def __init__(self, weight_shape, num_groups, prior, bias):
        super().__init__()
        self.prior = as_prior(GroupNormalJeffreys() if prior is None else prior)
        self.weight_shape = torch.Size(weight_shape)
        self.num_groups = num_groups
        self.has_bias = bias
        # follows the layer's device and dtype, for the prior of theta
        self.register_buffer("_zero", torch.zeros(()), persistent=False)
        self._theta_priors = {}

    @property
    def bias_shape(self) -> torch.Size:
        return self.weight_shape[:1]

    def site(self, what: str = "") -> str:
        """The name of the layer's site ``what`` (``"fc1.weight"``); with no ``what``, its prefix.

        The prefix is the layer's attribute path in the model; a layer used on its own is named
        after its class (``"BayesianLinear.weight"``).
        """
        prefix = self._pyro_name or type(self).__name__
        return f"{prefix}.{what}" if what else prefix

    def forward(self, x):
        z = self.prior(self.site(), self.num_groups)
        weight = pyro.sample(self.site("weight"), self._standard_normal(self.weight_shape))
        bias = None
        if self.has_bias:
            bias = pyro.sample(self.site("bias"), self._standard_normal(self.bias_shape))
        return preactivation(self, x, z, weight, bias)

    def _standard_normal(self, shape):
        # The prior of theta never changes: built once (and after .to()), not every step.
        prior = self._theta_priors.get(shape)
        if prior is None:
            prior = StandardNormal(shape, like=self._zero).to_event(len(shape))
            self._theta_priors[shape] = prior
        return prior

    def _apply(self, fn, *args, **kwargs):
        self._theta_priors = {}  # built again on the new device or dtype
        return super()._apply(fn, *args, **kwargs)

    def apply(self, x, z, weight, bias):
        """The layer's output for group scale ``z`` (``(G,)`` or per example ``(B, G)``)."""
        raise NotImplementedError

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        """Mean and variance of the output when ``theta ~ N(weight_loc, weight_var)``."""
        raise NotImplementedError


class BayesianLinear(BayesianLayer):
    """A dense layer with one group scale per input feature.

    Sites: the prior's (e.g. ``"fc1.scale"``), ``"fc1.weight"`` of shape ``(out, in)`` and
    ``"fc1.bias"`` of shape ``(out,)``.

    Example::

        layer = BayesianLinear(784, 300, prior=GroupNormalJeffreys())
        trace = pyro.poutine.trace(pyro.poutine.replay(layer, guide_trace)).get_trace(x)
    """

    group_side = "input"

    def __init__(self, in_features, out_features, bias=True, prior=None):
        super().__init__((out_features, in_features), in_features, prior, bias)
        self.in_features = in_features
        self.out_features = out_features

    def apply(self, x, z, weight, bias):
        return F.linear(x * z, weight, bias)

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        xz = x * z
        return F.linear(xz, weight_loc, bias_loc), F.linear(xz.pow(2), weight_var, bias_var)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.has_bias}, prior={self.prior}"


class BayesianConv2d(BayesianLayer):
    """A 2-d convolution with one group scale per output channel (filter).

    The scale multiplies the whole filter's output, bias included: ``(conv(x, theta) + b) * z``, so
    a pruned filter outputs exactly zero. Supports stride, padding, dilation and groups.

    Example::

        conv = BayesianConv2d(1, 20, 5, prior=GroupNormalJeffreys())
    """

    group_side = "output"

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        prior=None,
    ):
        kernel_size = nn.modules.utils._pair(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"BayesianConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must both be divisible by groups ({groups})"
            )
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(shape, out_channels, prior, bias)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = nn.modules.utils._pair(stride)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.groups = groups

    def _conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def apply(self, x, z, weight, bias):
        return self._conv(x, weight, bias) * _per_channel(z)

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        z = _per_channel(z)
        mean = self._conv(x, weight_loc, bias_loc) * z
        var = self._conv(x.pow(2), weight_var, bias_var) * z.pow(2)
        return mean, var

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.has_bias}, prior={self.prior}"
        )


def _per_channel(z):
    return z[..., None, None]


def _apply_sampled(layer, x, z, weight, bias):
    return layer.apply(x, z, weight, bias)


#: The layer's output as an effectful operation (message type ``"preactivation"``); by default
#: it is computed from the sampled values. See :mod:`pyro_bc.poutine`.
preactivation = effectful(_apply_sampled, type="preactivation")


class BayesianNetwork(PyroModule[nn.Sequential]):
    """A chain of layers with a categorical likelihood: a Pyro model of labels given inputs.

    ``forward(x, y=None)`` runs the layers and observes ``y`` at site ``"obs"`` inside
    ``pyro.plate("data", dataset_size, subsample_size=len(x))``, so a mini-batch's likelihood is
    scaled by ``dataset_size / len(x)``. Deterministic modules (activations, pooling, flatten)
    may sit between the Bayesian layers; :func:`pyro_bc.compress` thins such chains.

    Example::

        model = BayesianNetwork(
            OrderedDict(flatten=nn.Flatten(), fc1=BayesianLinear(784, 10)), dataset_size=60_000
        )
    """

    def __init__(self, layers, dataset_size=None, input_shape=None):
        if not isinstance(layers, OrderedDict):
            layers = OrderedDict((str(i), layer) for i, layer in enumerate(layers))
        super().__init__(layers)
        if dataset_size is not None and dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size}")
        self.dataset_size = dataset_size
        self.input_shape = None if input_shape is None else tuple(input_shape)

    def bayesian_layers(self):
        """The Bayesian layers in the order the model runs them."""
        return [m for m in self if isinstance(m, BayesianLayer)]

    def forward(self, x, y=None):
        logits = super().forward(x)
        batch_size = logits.shape[0]
        size = self.dataset_size or batch_size
        # The rows of a mini-batch stand for a random subsample of the data set; passing the
        # indices (rather than subsample_size) avoids a randperm over the whole data set per step.
        with pyro.plate("data", size, subsample=torch.arange(batch_size, device=logits.device)):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits
