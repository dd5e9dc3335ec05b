"""Bayesian layers whose forward pass is a Pyro model.

Each layer draws a group scale ``z`` from its prior (dense: one per input feature; conv: one per
output channel), standard-normal weights ``theta`` and, optionally, a bias, and returns the output
of the layer with weights ``w = z * theta``. The output goes through the effectful operation
:func:`preactivation`, so handlers in :mod:`pyro_bc.poutine` can compute it from the guide's
distributions instead (local reparameterization, posterior means) without changing the model.

What compression reads from a layer: :attr:`BayesianLayer.kind` (``"dense"`` or ``"conv"``),
:attr:`BayesianLayer.group_dim` (the weight axis the groups index), and
:meth:`BayesianLayer.plain_weights` (the weight and bias of the plain layer that computes the
layer's output for given scale and weights, batch norm folded in).
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

from .batches import check_inputs
from .checks import is_integer
from .distributions import StandardNormal
from .priors import GroupNormalJeffreys, as_prior, on_device

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

    #: what compression calls the layer: "dense" (groups are inputs) or "conv" (groups are filters)
    kind: str
    #: the dimension of the weight tensor that the groups index: 1 (inputs) or 0 (outputs)
    group_dim: int

    def __init__(self, weight_shape, num_groups, prior, bias):
        if not all(is_integer(n) and n > 0 for n in weight_shape):
            raise ValueError(
                f"{type(self).__name__}: sizes must be positive integers, got a weight of shape "
                f"{tuple(weight_shape)}"
            )
        super().__init__()
        self.prior = as_prior(GroupNormalJeffreys() if prior is None else prior)
        self.weight_shape = torch.Size(weight_shape)
        #: the weight shape of the layer this one was thinned from (:meth:`thinned`), which
        #: compression counts its rates against; its own shape otherwise
        self.full_weight_shape = self.weight_shape
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
        # a user's prior builds its constants with plain torch.tensor / torch.ones
        with on_device(self._zero.device):
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

    def group_view(self, per_group: torch.Tensor) -> torch.Tensor:
        """``per_group`` (shape ``(G,)``) reshaped to broadcast against the weight tensor.

        Example::

            layer.group_view(mean_z) * weight_loc  # E[z] mu, whatever the layer's kind
        """
        shape = [1] * len(self.weight_shape)
        shape[self.group_dim] = -1
        return per_group.reshape(shape)

    def plain_layer(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """An ordinary torch layer of this layer's kind computing with ``weight`` and ``bias``
        (of any number of kept units): what compression puts in the thinned network.

        Example::

            dense_mean = layer.plain_layer(weight_mean, bias_mean)
        """
        raise NotImplementedError

    def check_thinnable(self) -> None:
        """Raises a ``ValueError`` naming the layer if compression cannot remove its groups."""

    def thinned(self, in_keep: torch.Tensor, out_keep: torch.Tensor) -> BayesianLayer:
        """A new layer like this one (options, prior) with only the inputs ``in_keep`` and the
        outputs ``out_keep`` (boolean masks: input features or channels, output units or
        filters); state the model holds (batch norm) is sliced along, the guide is not. Its
        :attr:`full_weight_shape` stays this layer's, for compression's accounting.

        Example::

            small = model.fc2.thinned(fc2_in_keep, fc2_out_keep)  # BayesianLinear(87, 21)
        """
        raise NotImplementedError

    def output_affine(self):
        """The per-output affine map ``h -> a h + c`` the layer applies in eval mode between its
        weights and its group scale (batch norm), as ``(a, c)``; None when there is none.

        Example::

            a, c = conv_bn.output_affine()
        """
        return None

    def apply(self, x, z, weight, bias):
        """The layer's output for group scale ``z`` (``(G,)`` or per example ``(B, G)``)."""
        raise NotImplementedError

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        """Mean and variance of the output when ``theta ~ N(weight_loc, weight_var)``."""
        raise NotImplementedError

    def sample_output(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        """One draw of the output with ``theta ~ N(weight_loc, weight_var)`` drawn per example.

        Local reparameterization (:func:`pyro_bc.poutine.local_reparameterization`) calls it with
        a scale ``z`` of shape ``(B, G)``: one draw per example. The output is Gaussian given
        ``z``, so the default samples ``N(mean, var)`` from :meth:`moments`.

        Example::

            out = layer.sample_output(x, z, weight_loc, weight_var, bias_loc, bias_var)
        """
        mean, var = self.moments(x, z, weight_loc, weight_var, bias_loc, bias_var)
        # clamp keeps the square root's gradient finite where the variance is exactly zero
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def plain_weights(self, z, weight, bias):
        """Weight and bias of the plain layer (``F.linear`` or ``F.conv2d`` with this layer's
        options) whose output equals :meth:`apply` for scale ``z`` of shape ``(G,)``.

        Batch norm, if the layer has it, is folded in with its evaluation-mode statistics, so
        the equality holds in eval mode. With ``z = E[z]`` and the weight and bias means this is
        the posterior-mean network that compression thins and quantizes.

        Example::

            weight, bias = layer.plain_weights(mean_z, weight_loc, bias_loc)
        """
        raise NotImplementedError


class BayesianLinear(BayesianLayer):
    """A dense layer with one group scale per input feature.

    Sites: the prior's (e.g. ``"fc1.scale"``), ``"fc1.weight"`` of shape ``(out, in)`` and
    ``"fc1.bias"`` of shape ``(out,)``.

    Example::

        layer = BayesianLinear(784, 300, prior=GroupNormalJeffreys())
        trace = pyro.poutine.trace(pyro.poutine.replay(layer, guide_trace)).get_trace(x)
    """

    kind = "dense"
    group_dim = 1

    def __init__(self, in_features, out_features, bias=True, prior=None):
        super().__init__((out_features, in_features), in_features, prior, bias)
        self.in_features = in_features
        self.out_features = out_features

    def apply(self, x, z, weight, bias):
        return F.linear(x * z, weight, bias)

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        xz = x * z
        return F.linear(xz, weight_loc, bias_loc), F.linear(xz.pow(2), weight_var, bias_var)

    def plain_layer(self, weight, bias):
        out_features, in_features = weight.shape
        layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None)
        return _set_parameters(layer, weight, bias)

    def plain_weights(self, z, weight, bias):
        return weight * z, bias

    def thinned(self, in_keep, out_keep):
        layer = BayesianLinear(
            int(in_keep.sum()), int(out_keep.sum()), bias=self.has_bias, prior=self.prior
        )
        layer.full_weight_shape = self.full_weight_shape
        return layer.to(self._zero)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.has_bias}, prior={self.prior}"


class BayesianConv2d(BayesianLayer):
    """A 2-d convolution with one group scale per output channel (filter), optionally followed by
    batch norm.

    Without batch norm the scale multiplies the whole filter's output, bias included:
    ``(conv(x, theta) + b) * z``, so a pruned filter outputs exactly zero. Supports stride,
    padding, dilation and groups.

    **Batch norm** (``batch_norm=True``): the layer owns an ``nn.BatchNorm2d`` (attribute
    :attr:`batch_norm`) and the scale sits *after* it: ``z * BN(conv(x, theta))``. In training
    mode batch norm divides out any per-channel factor in front of it, so a scale placed before
    it would change nothing and could prune nothing; after it, a channel with ``z = 0`` outputs
    exactly zero in training and in eval mode. Local reparameterization (:meth:`sample_output`)
    samples the convolution's output from its Gaussian moments, normalises that sample, then
    multiplies it by the per-example scale. The batch norm's affine parameters and running
    statistics are point estimates held by the model, not the guide: Pyro's ``SVI`` and
    :func:`pyro_bc.fit` train the affine parameters along with the guide. Batch norm cancels a
    bias in front of it, so such a layer has none (``bias=False``). In eval mode batch norm is
    the per-channel affine map ``a h + c`` (:meth:`batch_norm_affine`), so the posterior-mean
    layer ``E[z] (a conv(x, mu) + c)`` is the plain convolution with weight ``E[z] a mu`` and
    bias ``E[z] c`` (:meth:`plain_weights`), which is what compression folds.

    Example::

        conv = BayesianConv2d(1, 20, 5, prior=GroupNormalJeffreys())
        conv_bn = BayesianConv2d(3, 64, 3, padding=1, bias=False, batch_norm=True)
    """

    kind = "conv"
    group_dim = 0

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
        batch_norm=False,
        bn_eps=1e-5,
        bn_momentum=0.1,
    ):
        kernel_size = nn.modules.utils._pair(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"BayesianConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must both be divisible by groups ({groups})"
            )
        if batch_norm and bias:
            raise ValueError(
                "BayesianConv2d: batch_norm=True cancels the convolution's bias; pass bias=False "
                "(pyro_bc.convert.bayesianize folds a trained bias into the batch norm)"
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
        # the nn.BatchNorm2d between the convolution and the scale, or None (a registered
        # child either way, so that _bn can read it from _modules)
        self.add_module(
            "batch_norm",
            nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum) if batch_norm else None,
        )

    @property
    def _bn(self):
        # Read past PyroModule.__getattr__, which would register the module's parameters in the
        # param store under a name that two models with the same layer names share.
        return self._modules["batch_norm"]

    def forward(self, x):
        if self._bn is not None:
            # Point estimates of the model: registered under a name unique to this layer so that
            # pyro.infer.SVI's optimizer finds them and two models never share them.
            pyro.module(f"{self.site('batch_norm')}_{id(self):x}", self._bn)
        return super().forward(x)

    def _conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _conv_moments(self, x, weight_loc, weight_var, bias_loc, bias_var):
        return self._conv(x, weight_loc, bias_loc), self._conv(x.pow(2), weight_var, bias_var)

    def apply(self, x, z, weight, bias):
        out = self._conv(x, weight, bias)
        if self._bn is not None:
            out = self._bn(out)
        return out * _per_channel(z)

    def plain_layer(self, weight, bias):
        layer = nn.utils.skip_init(
            nn.Conv2d,
            weight.shape[1],
            weight.shape[0],
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=bias is not None,
        )
        return _set_parameters(layer, weight, bias)

    def check_thinnable(self):
        if self.groups != 1:
            raise ValueError(
                f"compress: layer {self.site()!r} is a grouped convolution (groups={self.groups});"
                " removing filters would make its groups unequal, which nn.Conv2d cannot hold. "
                "Only groups=1 convolutions can be thinned."
            )

    def thinned(self, in_keep, out_keep):
        self.check_thinnable()
        bn = self._bn
        layer = BayesianConv2d(
            int(in_keep.sum()),
            int(out_keep.sum()),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.has_bias,
            prior=self.prior,
            batch_norm=bn is not None,
            bn_eps=1e-5 if bn is None else bn.eps,
            bn_momentum=0.1 if bn is None else bn.momentum,
        ).to(self._zero)
        layer.full_weight_shape = self.full_weight_shape
        if bn is not None:
            keep = out_keep.to(self._zero.device)
            state = {k: v if v.dim() == 0 else v[keep] for k, v in bn.state_dict().items()}
            layer._bn.load_state_dict(state)
            layer._bn.train(bn.training)
        return layer

    def moments(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        z = _per_channel(z)
        mean, var = self._conv_moments(x, weight_loc, weight_var, bias_loc, bias_var)
        if self._bn is not None:
            if self._bn.training:
                raise ValueError(
                    f"{self.site()}: in training mode batch norm uses the batch's statistics, so "
                    "the output has no Gaussian moments; use sample_output, or eval mode"
                )
            a, c = (t[:, None, None] for t in self.batch_norm_affine())
            mean, var = a * mean + c, a.pow(2) * var
        return mean * z, var * z.pow(2)

    def sample_output(self, x, z, weight_loc, weight_var, bias_loc, bias_var):
        if self._bn is None:
            return super().sample_output(x, z, weight_loc, weight_var, bias_loc, bias_var)
        mean, var = self._conv_moments(x, weight_loc, weight_var, bias_loc, bias_var)
        # clamp keeps the square root's gradient finite where the variance is exactly zero
        sample = mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)
        return self._bn(sample) * _per_channel(z)

    def output_affine(self):
        return None if self._bn is None else self.batch_norm_affine()

    def batch_norm_affine(self):
        """The batch norm in eval mode as a per-channel affine map ``h -> a h + c``: ``(a, c)``.

        ``a = gamma / sqrt(running_var + eps)`` and ``c = beta - a running_mean``, each of shape
        ``(out_channels,)``. Raises for a layer without batch norm.

        Example::

            a, c = conv.batch_norm_affine()
            # in eval mode: conv.batch_norm(h) == a[:, None, None] * h + c[:, None, None]
        """
        bn = self._bn
        if bn is None:
            raise ValueError(f"{self.site()} has no batch norm (built with batch_norm=False)")
        a = bn.weight / (bn.running_var + bn.eps).sqrt()
        return a, bn.bias - a * bn.running_mean

    def plain_weights(self, z, weight, bias):
        z = z.reshape(-1)
        if self._bn is None:
            return weight * _per_filter(z), None if bias is None else bias * z
        a, c = self.batch_norm_affine()
        shift = c if bias is None else a * bias + c
        return weight * _per_filter(z * a), z * shift

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.has_bias}, prior={self.prior}"
        )


def _per_channel(z):
    return z[..., None, None]


@torch.no_grad()
def _set_parameters(layer, weight, bias):
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _per_filter(z):
    return z[:, None, None, None]


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

    :param input_shape: the shape of one example, e.g. ``(1, 28, 28)``; given it, ``forward``
        refuses batches of another shape or of integers with an error that names both.

    Example::

        model = BayesianNetwork(
            OrderedDict(flatten=nn.Flatten(), fc1=BayesianLinear(784, 10)), dataset_size=60_000
        )
    """

    def __init__(self, layers, dataset_size=None, input_shape=None):
        if not isinstance(layers, OrderedDict):
            layers = OrderedDict((str(i), layer) for i, layer in enumerate(layers))
        super().__init__(layers)
        if dataset_size is not None and not (is_integer(dataset_size) and dataset_size >= 1):
            raise ValueError(
                f"{type(self).__name__}: dataset_size must be a positive integer, got "
                f"{dataset_size!r}"
            )
        self.dataset_size = dataset_size
        self.input_shape = None if input_shape is None else tuple(input_shape)

    def bayesian_layers(self):
        """The Bayesian layers in the order the model runs them."""
        return [m for m in self if isinstance(m, BayesianLayer)]

    def forward(self, x, y=None):
        if self.input_shape is not None:  # a network without one may take integers (embeddings)
            check_inputs(x, self.input_shape, type(self).__name__)
        logits = super().forward(x)
        batch_size = logits.shape[0]
        size = self.dataset_size or batch_size
        # The rows of a mini-batch stand for a random subsample of the data set; passing the
        # indices (rather than subsample_size) avoids a randperm over the whole data set per step.
        with pyro.plate("data", size, subsample=torch.arange(batch_size, device=logits.device)):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits
