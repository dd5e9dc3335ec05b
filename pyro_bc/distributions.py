"""
Priors of Bayesian Compression and the closed-form KL divergences that
:class:`~pyro.infer.TraceMeanField_ELBO` needs to train them without Monte Carlo noise.

Importing this module registers, with :func:`torch.distributions.kl.register_kl`:

- ``Normal || ImproperLogUniform``: the Molchanov et al. (2017) approximation (group
  normal-Jeffreys prior, "group variational dropout");
- ``LogNormal || Gamma`` and ``LogNormal || InverseGamma``: exact (group horseshoe written as
  a product of Gamma and inverse-Gamma scale factors);
- ``NormalLogVar || StandardNormal``: exact, from the log-variance directly (the weights).

:class:`LogitNormal`, the guide of sites on ``(0, 1)``, is a transformed Normal, so torch's own
``TransformedDistribution`` rule gives its KL against another logit-normal in closed form.

The pairs are registered on the :mod:`torch.distributions` base classes, so Pyro's subclasses
(``pyro.distributions.Normal``, ``LogNormal``, ``Gamma``, ``InverseGamma``) dispatch to them,
and Pyro's own ``Independent || Independent`` rule makes ``.to_event(n)`` forms work too.
"""

import functools
import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from pyro.distributions.util import broadcast_shape
from torch.distributions import Gamma, InverseGamma, LogNormal, Normal, constraints, kl_divergence
from torch.distributions.kl import register_kl
from torch.distributions.transforms import SigmoidTransform

__all__ = [
    "ImproperLogUniform",
    "LogitNormal",
    "NormalLogVar",
    "StandardNormal",
    "kl_sum",
    "log_alpha",
    "molchanov_kl",
    "normal_moments",
    "unwrap",
]

# Constants of Molchanov, Ashukha & Vetrov (2017), "Variational Dropout Sparsifies DNNs", eq. 14.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


class ImproperLogUniform(TorchDistribution):
    """
    Improper log-uniform (normal-Jeffreys) scale prior ``p(z) ∝ 1 / |z|`` on ``z ≠ 0``.

    This is the prior on the group scale ``z`` of the group normal-Jeffreys prior of Bayesian
    Compression. It has no normalising constant, so :meth:`log_prob` is ``-log|z|`` and it has
    no draws (:meth:`sample` gives the placeholder 1): the value of a site with this prior must
    come from a guide, as in :class:`~pyro.infer.SVI`. With a
    :class:`~pyro.distributions.Normal` guide, :class:`~pyro.infer.TraceMeanField_ELBO` uses the
    closed-form approximate KL (see :func:`molchanov_kl`) registered by this module.

    Example::

        def model():
            pyro.sample("z", ImproperLogUniform().expand([300]).to_event(1))

        def guide():
            loc = pyro.param("z_loc", torch.ones(300))
            scale = pyro.param("z_scale", torch.full((300,), 0.01), constraints.positive)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        elbo = pyro.infer.TraceMeanField_ELBO()
        loss = elbo.differentiable_loss(model, guide)  # deterministic: KL in closed form

    :param torch.Size batch_shape: The batch shape (default scalar); :meth:`expand` also works.
    :param bool validate_args: Whether to validate the values passed to :meth:`log_prob`.
    """

    arg_constraints = {}
    # The support is really R \ {0}; z = 0 has infinite log density, which is as close as a
    # Constraint gets.
    support = constraints.real
    has_rsample = False

    def __init__(self, batch_shape=(), validate_args=None):
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        # A native expand (instead of Pyro's generic ExpandedDistribution wrapper) keeps the
        # type, so KL dispatch on ImproperLogUniform works for expanded priors.
        new = self._get_checked_instance(ImproperLogUniform, _instance)
        super(ImproperLogUniform, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        shape = broadcast_shape(value.shape, self.batch_shape)
        return -value.abs().log().expand(shape)

    def rsample(self, sample_shape=()):
        raise NotImplementedError(
            "ImproperLogUniform is an improper prior (p(z) ∝ 1/|z|) and has no reparameterized "
            "draws. The value of its site must come from a guide: use it in a model trained "
            "with SVI, or run the model under poutine.replay(model, trace=guide_trace)."
        )

    def sample(self, sample_shape=()):
        """Returns the placeholder ``1``: an improper prior has no draws.

        Pyro's initialisation strategies (``init_to_sample``, and ``Predictive``'s run of the
        model to learn its shapes) need a point in the support. A model run without a guide
        therefore gets ``z = 1`` at these sites: useful to see its sites and shapes, but not a
        draw from the prior.
        """
        return torch.ones(torch.Size(sample_shape) + self.batch_shape)


class NormalLogVar(dist.Normal):
    """A Normal given by its mean and log-variance, which it keeps for closed forms.

    The guides parameterise variances by their logarithm. Keeping it spares the KL a
    ``log(scale^2)`` per weight and step, and the standard deviation is only computed when
    something asks for it: under local reparameterization nothing does.

    Example::

        q = NormalLogVar(torch.zeros(3), torch.full((3,), -9.0))
        kl = torch.distributions.kl_divergence(q, StandardNormal((3,)))
    """

    def __init__(self, loc, log_var, validate_args=None):
        if loc.shape != log_var.shape:
            loc, log_var = torch.broadcast_tensors(loc, log_var)
        self.loc, self.log_var = loc, log_var
        torch.distributions.Distribution.__init__(self, self.loc.shape, validate_args=validate_args)

    @functools.cached_property
    def variance(self):
        return self.log_var.exp()

    @functools.cached_property
    def scale(self):
        return (0.5 * self.log_var).exp()

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return NormalLogVar(
            self.loc.expand(batch_shape),
            self.log_var.expand(batch_shape),
            validate_args=self.__dict__.get("_validate_args"),
        )


class StandardNormal(dist.Normal):
    """``N(0, 1)`` with a batch shape: the prior of the non-centred weights ``theta``.

    Example::

        theta_prior = StandardNormal((300, 784)).to_event(2)
    """

    def __init__(self, batch_shape=(), *, like=None, validate_args=None):
        like = torch.zeros(()) if like is None else like
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        batch_shape = torch.Size(batch_shape)
        super().__init__(
            zero.expand(batch_shape), (zero + 1).expand(batch_shape), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        return StandardNormal(
            batch_shape, like=self.loc, validate_args=self.__dict__.get("_validate_args")
        )


def _expand(kl, p, q):
    shape = broadcast_shape(p.batch_shape, q.batch_shape)
    # an expand that changes nothing would still cost an autograd node every step
    return kl if kl.shape == shape else kl.expand(shape)


class LogitNormal(dist.TransformedDistribution):
    """The logit-normal distribution on ``(0, 1)``: ``sigmoid(x)`` with ``x ~ N(loc, scale^2)``.

    The guide's family for sites whose support is the unit interval (a relaxed spike-and-slab's
    Beta gate, say). Its draws are reparameterized; it has no closed-form mean, so posterior
    moments of a scale built from it come from Monte Carlo
    (:meth:`pyro_bc.priors.GroupPrior.scale_moments`). Against a prior written as a logit-normal,
    ``dist.TransformedDistribution(dist.Normal(m, s), SigmoidTransform())``, its KL is the
    closed form between the two Normals; against a Beta there is none and ``TraceMeanField_ELBO``
    uses Monte Carlo (:func:`pyro_bc.kl_audit` names such sites).

    Example::

        q = LogitNormal(torch.zeros(3), torch.ones(3))
        q.rsample()  # three values in (0, 1)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, loc, scale, validate_args=None):
        base = Normal(loc, scale, validate_args=validate_args)
        super().__init__(base, SigmoidTransform(), validate_args=validate_args)

    @property
    def loc(self):
        return self.base_dist.loc

    @property
    def scale(self):
        return self.base_dist.scale

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LogitNormal, _instance)
        return super().expand(batch_shape, _instance=new)


@register_kl(NormalLogVar, StandardNormal)
def _kl_normal_log_var_standard_normal(p, q):
    kl = 0.5 * (p.loc.pow(2) + p.variance - 1 - p.log_var)
    return _expand(kl, p, q)


def kl_sum(p, q):
    """``kl_divergence(p, q).sum()``, with fewer ops over big tensors where a pair allows it.

    For the weights, ``NormalLogVar || StandardNormal`` of one shape, each of the KL's terms is
    summed on its own, ``(sum(loc^2) + sum(var) - sum(log_var) - n) / 2``: one temporary the size
    of the weights instead of four, and none in the backward pass of the sums.

    Example::

        kl_sum(NormalLogVar(torch.zeros(3), torch.zeros(3)), StandardNormal((3,)))  # tensor(0.)
    """
    if type(p) is NormalLogVar and type(q) is StandardNormal and p.batch_shape == q.batch_shape:
        terms = p.loc.pow(2).sum() + p.variance.sum() - p.log_var.sum()
        return 0.5 * (terms - p.batch_shape.numel())
    kl = kl_divergence(p, q)
    # a rule may give one number for every element
    return kl.sum() if torch.is_tensor(kl) else kl * p.batch_shape.numel()


def unwrap(fn):
    """The distribution inside any ``.to_event(...)`` wrappers.

    Example::

        unwrap(dist.Normal(0.0, 1.0).expand([3]).to_event(1))   # Normal, batch shape (3,)
    """
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def normal_moments(fn, site: str):
    """Mean and variance of a (possibly ``.to_event``) Normal ``fn`` at ``site``.

    :raises ValueError: naming the site, if ``fn`` is not a Normal.

    Example::

        loc, var = normal_moments(guide.distributions()["fc1.weight"], "fc1.weight")
    """
    base = unwrap(fn)
    if not isinstance(base, Normal):
        raise ValueError(
            f"site {site!r}: the guide's distribution is {type(base).__name__}; posterior means "
            "and variances of weights and biases need a Normal"
        )
    return base.loc, base.variance


def log_alpha(loc, scale):
    """
    Numerically stable dropout rate ``log alpha = log(scale^2 / loc^2)`` of ``N(loc, scale^2)``.

    ``|loc|`` and ``scale`` are clamped at the smallest normal float of their dtype, so that
    ``loc = 0`` gives a large finite ``log alpha`` and gradients stay finite.

    Example::

        >>> log_alpha(torch.tensor([1.0, 0.1]), torch.tensor([0.1, 1.0]))
        tensor([-4.6052,  4.6052])

    :param torch.Tensor loc: Mean of the Normal.
    :param torch.Tensor scale: Standard deviation of the Normal.
    :rtype: torch.Tensor
    """
    tiny = torch.finfo(torch.result_type(loc, scale)).tiny
    return 2 * (scale.clamp_min(tiny).log() - loc.abs().clamp_min(tiny).log())


def molchanov_kl(log_alpha):
    """
    Molchanov et al. (2017) approximation of ``KL(N(mu, alpha mu^2) || p(z) ∝ 1/|z|)``.

    The true KL against this improper prior is only defined up to an additive constant; the
    approximation fixes it so that the KL tends to 0 as ``alpha -> inf`` (and is positive
    otherwise)::

        KL ≈ -(k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(1 / alpha) - k1)

    computed as ``k1 sigmoid(-k2 - k3 log_alpha) + 0.5 softplus(-log_alpha)``, which is the
    same expression without overflow or cancellation for very small or very large alpha.

    Example::

        >>> molchanov_kl(torch.tensor([-8.0, 0.0, 8.0]))
        tensor([4.6359e+00, 4.3124e-01, 1.6837e-04])

    :param torch.Tensor log_alpha: ``log(sigma^2 / mu^2)``, e.g. from :func:`log_alpha`.
    :rtype: torch.Tensor
    """
    return _K1 * torch.sigmoid(-(_K2 + _K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)


@register_kl(Normal, ImproperLogUniform)
def _kl_normal_improper_log_uniform(p, q):
    if isinstance(p, NormalLogVar):
        tiny = torch.finfo(p.loc.dtype).tiny
        kl = molchanov_kl(p.log_var - p.loc.pow(2).clamp_min(tiny).log())
    else:
        kl = molchanov_kl(log_alpha(p.loc, p.scale))
    return _expand(kl, p, q)


def _half_log_2pi_v(s):
    # 0.5 log(2 pi v) for the log-variance v = s^2 of a LogNormal(m, s).
    return 0.5 * math.log(2 * math.pi) + s.log()


@register_kl(LogNormal, Gamma)
def _kl_lognormal_gamma(p, q):
    # With q = LN(m, v) and p = Gamma(k, rate r), using E[log x] = m, E[x] = exp(m + v / 2):
    # KL = r exp(m + v/2) - k m - k log r + lgamma(k) - 0.5 log(2 pi v) - 0.5.
    m, s = p.loc, p.scale
    k, r = q.concentration, q.rate
    return (
        r * torch.exp(m + 0.5 * s**2)
        - k * m
        - k * r.log()
        + torch.lgamma(k)
        - _half_log_2pi_v(s)
        - 0.5
    )


@register_kl(LogNormal, InverseGamma)
def _kl_lognormal_inverse_gamma(p, q):
    # InverseGamma(k, rate b) has density b^k / Gamma(k) x^(-k-1) exp(-b / x); b is the scale
    # of the inverse-gamma (the rate of the Gamma it inverts). With E[1/x] = exp(-m + v/2):
    # KL = b exp(-m + v/2) + k m - k log b + lgamma(k) - 0.5 log(2 pi v) - 0.5.
    # pyro.distributions.InverseGamma subclasses the torch class, so it dispatches here too.
    m, s = p.loc, p.scale
    k, b = q.concentration, q.rate
    return (
        b * torch.exp(-m + 0.5 * s**2)
        + k * m
        - k * b.log()
        + torch.lgamma(k)
        - _half_log_2pi_v(s)
        - 0.5
    )
