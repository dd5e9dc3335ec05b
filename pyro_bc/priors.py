"""Group-scale priors, written as Pyro models.

A prior is any callable ``prior(name, num_groups) -> scale`` made of ``pyro.sample`` statements; it
returns the group scale ``z`` of shape ``(num_groups,)``. The layers in :mod:`pyro_bc.nn` multiply
their standard-normal weights by it (``w = z * theta``), so the prior on the weights is a Gaussian
scale mixture. Classes here add what compression needs on top of the Pyro model: how to initialise
the guide and the posterior moments of the scale.

Example::

    def half_cauchy_groups(name, num_groups):
        tau = pyro.sample(f"{name}.tau", dist.HalfCauchy(1.0))
        lam = pyro.sample(f"{name}.lam", dist.HalfCauchy(torch.ones(num_groups)).to_event(1))
        return tau * lam

    layer = pyro_bc.nn.BayesianLinear(784, 300, prior=half_cauchy_groups)
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.distributions import LogNormal

from .distributions import ImproperLogUniform, unwrap

MOMENT_SAMPLES = 4096


class _PosteriorDraws(Messenger):
    """Replaces every sample site by a draw of ``sample_shape`` from the recorded posterior."""

    def __init__(self, posteriors, sample_shape):
        super().__init__()
        self.posteriors = posteriors
        self.sample_shape = torch.Size(sample_shape)

    def _pyro_sample(self, msg):
        msg["value"] = _draw(self.posteriors, msg["name"], self.sample_shape)
        msg["done"] = True


def _posterior(posteriors, site):
    try:
        return posteriors[site]
    except KeyError:
        raise KeyError(
            f"no guide distribution recorded for site {site!r}: run the guide inside the "
            "same pyro_bc.poutine handler as the model"
        ) from None


def _draw(posteriors, site, sample_shape):
    """Draws ``sample_shape`` values of ``site`` from its guide distribution in ``posteriors``."""
    value = _posterior(posteriors, site).rsample(sample_shape)
    if value.dim() == len(sample_shape):
        # A scalar site (e.g. a layer's global scale) broadcasts against the groups.
        value = value.unsqueeze(-1)
    return value


def draw_group_scale(prior, name, num_groups, posteriors, num_draws):
    """Draws the group scale ``num_draws`` times from the guide: shape ``(num_draws, num_groups)``.

    Reruns the prior's Pyro model with each of its sites drawn from ``posteriors`` (site name ->
    guide distribution), so it works for any prior, including a user's function. The prior runs
    on the guide's device (:func:`on_device`).

    Example::

        z = draw_group_scale(layer.prior, "fc1", 784, guide.distributions(), num_draws=128)
    """
    with (
        on_device(posterior_device(posteriors)),
        poutine.block(),
        _PosteriorDraws(posteriors, (num_draws,)),
    ):
        return prior(name, num_groups)


def on_device(device):
    """Runs a prior's tensor factories (``torch.tensor(1.0)``, ``torch.ones(n)``) on ``device``.

    Priors are plain Pyro models that build their constants without a device; the layers and the
    guide run them inside this context so those constants land where the parameters are.

    Example::

        with on_device(torch.device("meta")):
            z = prior("fc1", 784)
    """
    return contextlib.nullcontext() if device is None else torch.device(device)


def posterior_device(posteriors: dict):
    """The device of the guide's distributions (site name -> distribution), or None if unknown.

    Example::

        posterior_device(guide.distributions())  # device(type='cpu')
    """
    for fn in posteriors.values():
        while True:
            fn = unwrap(fn)
            if not hasattr(fn, "base_dist"):
                break
            fn = fn.base_dist
        for value in vars(fn).values():
            if isinstance(value, torch.Tensor):
                return value.device
    return None


class GroupPrior:
    """Base class of the built-in priors and the wrapper of user functions.

    Subclasses implement :meth:`__call__` (the Pyro model) and may override
    :meth:`guide_family` (the guide's family at one site), :meth:`guide_init` (initial values of
    the guide's parameters for one site) and :meth:`scale_moments` (posterior mean and variance
    of the group scale given the guide's distributions). The defaults work for any prior: the
    family that matches each site's support, moments by Monte Carlo through
    :func:`draw_group_scale`.
    """

    #: how far apart (in units of the pruning quantity) the kept and the pruned mode of a layer's
    #: histogram must be for ``compress(thresholds="auto")`` to split them
    #: (:func:`pyro_bc.compression.histogram_valley`); closer bumps are read as one mode.
    mode_separation: float = 4.0

    def __call__(self, name: str, num_groups: int) -> torch.Tensor:
        raise NotImplementedError

    def guide_family(self, site: str, support) -> str | None:
        """The name of the guide's family at ``site`` (support ``support``), or None for the
        default: ``"normal"`` on the real line, ``"lognormal"`` on ``(0, inf)``,
        ``"logitnormal"`` on ``(0, 1)`` (:data:`pyro_bc.guides.GUIDE_FAMILIES`).

        Any family whose draws lie in the support may be chosen, e.g. a log-normal for a scale
        whose prior is on the whole real line. :func:`pyro_bc.kl_audit` shows which of the
        resulting (guide, prior) pairs have a closed-form KL.

        Example::

            class SpikeAndSlab(GroupPrior):
                def __call__(self, name, num_groups):
                    gate = dist.Beta(torch.full((num_groups,), 0.2), 1.0).to_event(1)
                    return pyro.sample(f"{name}.gate", gate)

                def guide_family(self, site, support):
                    return "logitnormal"  # the default for (0, 1), written out
        """
        return None

    def guide_init(self, site: str, shape: torch.Size) -> dict | None:
        """Initial ``loc`` and ``log_var`` of the guide at ``site``, or None for the defaults."""
        return None

    def draw_scale(self, name: str, num_groups: int, posteriors: dict, num_draws: int):
        """The group scale drawn ``num_draws`` times from the guide: ``(num_draws, num_groups)``.

        Local reparameterization draws it once per example of every batch. The default reruns
        the prior's Pyro model (:func:`draw_group_scale`); the built-in priors override it with
        the same distribution drawn directly from the guide's factors, which is cheaper.

        Example::

            z = layer.prior.draw_scale("fc1", 784, guide.distributions(), num_draws=128)
        """
        return draw_group_scale(self, name, num_groups, posteriors, num_draws)

    def scale_moments(self, name: str, num_groups: int, posteriors: dict):
        """Posterior mean and variance of the group scale, each of shape ``(num_groups,)``.

        ``posteriors`` maps each of this prior's site names to its guide distribution.
        """
        # A fixed seed keeps compression a deterministic function of the guide.
        device = posterior_device(posteriors)
        cuda = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(0)
            draws = draw_group_scale(self, name, num_groups, posteriors, MOMENT_SAMPLES)
        return draws.mean(0), draws.var(0)

    def set_guide_scale(self, name: str, locs: dict, scale: torch.Tensor) -> None:
        """Moves the guide's ``locs`` (site name -> loc tensor, changed in place) so that the
        posterior group scale is about ``scale`` (shape ``(num_groups,)``).

        :meth:`pyro_bc.StructuredGuide.init_from` uses it with ``rescale=True``. Priors written as
        plain functions have no such map from scale to guide parameters; subclass
        :class:`GroupPrior` and override this method to support them.

        Example::

            class LogNormalScales(GroupPrior):
                def __call__(self, name, num_groups):
                    prior = dist.LogNormal(torch.zeros(num_groups), 1.0).to_event(1)
                    return pyro.sample(f"{name}.scale", prior)

                def set_guide_scale(self, name, locs, scale):
                    locs[f"{name}.scale"].copy_(scale.log())  # the guide is log-normal
        """
        raise NotImplementedError(
            f"{self!r} cannot set its guide's group scale (layer {name!r}): override "
            "GroupPrior.set_guide_scale, or call init_from(..., rescale=False)"
        )

    def log_dropout_rate(self, name: str, num_groups: int, posteriors: dict) -> torch.Tensor:
        """The pruning quantity: ``log(Var[z] / E[z]^2)`` of the group scale under the guide.

        It is the log of the group's "dropout rate" alpha: large when the scale's posterior is
        mostly noise, so the group is pruned when it exceeds a threshold.
        """
        mean, var = self.scale_moments(name, num_groups, posteriors)
        return var.log() - mean.pow(2).log()

    def _built(self, key, build):
        """``build()``, called once per ``key``: a prior's distributions are the same at every
        step, and building them costs as much as the rest of its model."""
        built = self.__dict__.setdefault("_distributions", {})
        if key not in built:
            built[key] = build()
        return built[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FunctionPrior(GroupPrior):
    """Wraps a user's ``prior(name, num_groups)`` function so it has the :class:`GroupPrior` API.

    Example::

        prior = FunctionPrior(half_cauchy_groups)
    """

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"a prior must be callable as prior(name, num_groups); got {fn!r}")
        self.fn = fn

    def __call__(self, name, num_groups):
        return self.fn(name, num_groups)

    def __repr__(self):
        return f"FunctionPrior({getattr(self.fn, '__name__', self.fn)!r})"


def as_prior(prior) -> GroupPrior:
    """Returns ``prior`` as a :class:`GroupPrior`, wrapping plain functions."""
    return prior if isinstance(prior, GroupPrior) else FunctionPrior(prior)


class GroupNormalJeffreys(GroupPrior):
    """The group normal-Jeffreys prior ("group variational dropout"): ``p(z) ∝ 1/|z|``.

    One site, ``"<name>.scale"``, of shape ``(num_groups,)``. Its guide is
    ``N(mu_z, sigma_z^2)`` initialised as in the authors' code (``mu_z ~ N(1, 0.01^2)``,
    ``log sigma_z^2 ~ N(-9, 0.01^2)``),
    the KL is Molchanov et al.'s approximation, and the pruning quantity is
    ``log alpha = log sigma_z^2 - log mu_z^2``.

    Example::

        model = LeNet300100(prior=GroupNormalJeffreys(), dataset_size=60_000)
    """

    def __call__(self, name, num_groups):
        prior = self._built(
            num_groups, lambda: ImproperLogUniform().expand([num_groups]).to_event(1)
        )
        return pyro.sample(f"{name}.scale", prior)

    def guide_init(self, site, shape):
        return {
            "loc": 1.0 + 0.01 * torch.randn(shape),
            "log_var": -9.0 + 0.01 * torch.randn(shape),
        }

    def draw_scale(self, name, num_groups, posteriors, num_draws):
        # the same draws (and random numbers) as draw_group_scale, without rerunning the model
        return _posterior(posteriors, f"{name}.scale").rsample((num_draws,))

    def scale_moments(self, name, num_groups, posteriors):
        q = unwrap(posteriors[f"{name}.scale"])
        return q.loc, q.scale.pow(2)

    def set_guide_scale(self, name, locs, scale):
        locs[f"{name}.scale"].copy_(scale)


class GroupHorseshoe(GroupPrior):
    """The group horseshoe: ``w_ij = z_i * s * theta_ij``, ``s ~ C+(0, tau0)``, ``z_i ~ C+(0, 1)``.

    Each half-Cauchy is written as a scale mixture so that log-normal guides have closed-form
    KLs (``docs/method.md#group-horseshoe``): ``s^2 = s_a * s_b`` with
    ``s_a ~ Gamma(1/2, rate=1/tau0^2)``,
    ``s_b ~ InverseGamma(1/2, 1)``, and ``z_i^2 = a_i * b_i`` with ``a_i ~ Gamma(1/2, 1)``,
    ``b_i ~ InverseGamma(1/2, 1)``. Sites: ``"<name>.global_a"``, ``"<name>.global_b"`` (scalars),
    ``"<name>.local_a"``, ``"<name>.local_b"`` (one per group). The group scale it returns is
    ``sqrt(s_a * s_b * a_i * b_i)``; under log-normal guides it is log-normal,
    ``log z_i ~ N(sum of the four locs / 2, sum of the four variances / 4)``.

    The guide starts every group scale at 1 (``s_a`` at ``tau0^2``, ``s_b`` at ``1/tau0^2``) so
    that, as for the normal-Jeffreys prior, the initial weights are the means of ``theta``.

    Pruning quantity (:meth:`log_dropout_rate`): the log "dropout rate" of the effective scale,
    ``log(Var[z_i] / E[z_i]^2) = log(exp(V_i) - 1)`` with ``V_i`` the variance of ``log z_i``,
    the same quantity as the normal-Jeffreys prior's ``log alpha`` (a group whose scale the data
    do not pin down is noise); :func:`pyro_bc.plots.pruning_histograms` draws its histogram.

    Example::

        model = LeNet5Caffe(prior=GroupHorseshoe(tau0=1e-5), dataset_size=60_000)
    """

    #: A group at its prior has ``V_i`` about ``(pi^2/2 + pi^2/2) / 4``, so its pruning quantity is
    #: at most about ``log(exp(2.47) - 1) = 2.4``: the pruned mode sits a few units above the
    #: kept one, not ten or more as with the normal-Jeffreys prior's unbounded ``log alpha``.
    mode_separation = 2.0

    def __init__(self, tau0: float = 1e-5):
        if not tau0 > 0:
            raise ValueError(f"GroupHorseshoe: tau0 must be positive, got {tau0}")
        self.tau0 = tau0

    def __call__(self, name, num_groups):
        global_a, global_b, local_a, local_b = self._built(
            (num_groups, self.tau0), lambda: self._factor_priors(num_groups)
        )
        s_a = pyro.sample(f"{name}.global_a", global_a)
        s_b = pyro.sample(f"{name}.global_b", global_b)
        a = pyro.sample(f"{name}.local_a", local_a)
        b = pyro.sample(f"{name}.local_b", local_b)
        return (s_a * s_b * a * b).sqrt()

    def _factor_priors(self, num_groups):
        half = torch.tensor(0.5)
        local = torch.full((num_groups,), 0.5)
        return (
            dist.Gamma(half, torch.tensor(self.tau0**-2)),
            dist.InverseGamma(half, torch.tensor(1.0)),
            dist.Gamma(local, torch.ones(num_groups)).to_event(1),
            dist.InverseGamma(local, torch.ones(num_groups)).to_event(1),
        )

    def guide_init(self, site, shape):
        log_tau0_sq = 2 * math.log(self.tau0)
        loc = {"global_a": log_tau0_sq, "global_b": -log_tau0_sq}.get(site.rsplit(".", 1)[-1], 0.0)
        return {
            "loc": torch.full(shape, loc) + 0.01 * torch.randn(shape),
            "log_var": -9.0 + 0.01 * torch.randn(shape),
        }

    def set_guide_scale(self, name, locs, scale):
        # log z_i is half the sum of the four locs: the local Gamma factor takes up the change.
        others = sum(locs[f"{name}.{part}"] for part in ("global_a", "global_b", "local_b"))
        locs[f"{name}.local_a"].copy_(2 * scale.log() - others)

    def log_scale_posterior(self, name, posteriors):
        """Mean and variance of ``log z_i`` (each group's effective scale) under the guide."""
        factors = [
            unwrap(posteriors[f"{name}.{part}"])
            for part in ("global_a", "global_b", "local_a", "local_b")
        ]
        mean = sum(f.loc for f in factors) / 2
        var = sum(f.scale.pow(2) for f in factors) / 4
        return mean, var

    def draw_scale(self, name, num_groups, posteriors, num_draws):
        horseshoe = self._draw_horseshoe(name, num_groups, posteriors, num_draws)
        if horseshoe is None:
            return draw_group_scale(self, name, num_groups, posteriors, num_draws)
        return horseshoe

    def _draw_horseshoe(self, name, num_groups, posteriors, num_draws):
        """The horseshoe's scale drawn from log-normal factors; None for other guide families."""
        factors = [
            unwrap(_posterior(posteriors, f"{name}.{part}"))
            for part in ("global_a", "global_b", "local_a", "local_b")
        ]
        if not all(isinstance(f, LogNormal) for f in factors):
            return None
        # Under log-normal factors, 2 log z_i is a global Normal shared by the groups plus a
        # Normal per group: two draws instead of the model's four give the same joint law.
        global_a, global_b, local_a, local_b = factors
        loc = global_a.loc + global_b.loc + local_a.loc + local_b.loc
        global_sd = (global_a.scale.pow(2) + global_b.scale.pow(2)).sqrt()
        local_sd = (local_a.scale.pow(2) + local_b.scale.pow(2)).sqrt()
        eps_global = loc.new_empty((num_draws, 1)).normal_()
        eps_local = loc.new_empty((num_draws, num_groups)).normal_()
        return (0.5 * (loc + eps_global * global_sd + eps_local * local_sd)).exp()

    def scale_moments(self, name, num_groups, posteriors):
        m, v = self.log_scale_posterior(name, posteriors)
        mean = (m + v / 2).exp()
        return mean, mean.pow(2) * v.expm1()

    def __repr__(self):
        return f"GroupHorseshoe(tau0={self.tau0:g})"


class RegularizedHorseshoe(GroupHorseshoe):
    """The regularized ("Finnish") horseshoe of Piironen & Vehtari (2017), on group scales.

    The horseshoe's scale ``h_i = s * z_i`` (:class:`GroupHorseshoe`, same sites) is softly
    capped by a slab of width ``c``: ``z_i = sqrt(c^2 h_i^2 / (c^2 + h_i^2))``, with
    ``c^2 ~ InverseGamma(slab_df / 2, slab_df * slab_scale^2 / 2)`` at site ``"<name>.slab"``.
    Groups the data need keep a scale near ``c`` instead of growing without bound, which keeps
    their weights and therefore their bit widths in check; the rest are shrunk as by the
    horseshoe. Every KL is closed form; the moments of the scale are Monte Carlo (the default of
    :class:`GroupPrior`), as for any prior a user writes. :meth:`set_guide_scale` sets the
    horseshoe's part, which is close to the scale while it is well below ``slab_scale``.

    Example::

        model = LeNet300100(prior=RegularizedHorseshoe(tau0=1e-5, slab_scale=2.0))
    """

    def __init__(self, tau0: float = 1e-5, slab_scale: float = 2.0, slab_df: float = 4.0):
        super().__init__(tau0)
        if not (slab_scale > 0 and slab_df > 0):
            raise ValueError(
                f"RegularizedHorseshoe: slab_scale and slab_df must be positive, "
                f"got {slab_scale} and {slab_df}"
            )
        self.slab_scale = slab_scale
        self.slab_df = slab_df

    def __call__(self, name, num_groups):
        horseshoe = super().__call__(name, num_groups)
        slab = self._built(("slab", self.slab_df, self.slab_scale), self._slab_prior)
        c2 = pyro.sample(f"{name}.slab", slab)
        h2 = horseshoe.pow(2)
        return (c2 * h2 / (c2 + h2)).sqrt()

    def _slab_prior(self):
        shape = torch.tensor(self.slab_df / 2)
        return dist.InverseGamma(shape, shape * self.slab_scale**2)

    def guide_init(self, site, shape):
        if site.endswith(".slab"):
            loc = 2 * math.log(self.slab_scale)
            return {"loc": torch.full(shape, loc), "log_var": torch.full(shape, -9.0)}
        return super().guide_init(site, shape)

    def draw_scale(self, name, num_groups, posteriors, num_draws):
        horseshoe = self._draw_horseshoe(name, num_groups, posteriors, num_draws)
        if horseshoe is None:
            return draw_group_scale(self, name, num_groups, posteriors, num_draws)
        h2 = horseshoe.pow(2)
        c2 = _draw(posteriors, f"{name}.slab", (num_draws,))
        return (c2 * h2 / (c2 + h2)).sqrt()

    scale_moments = GroupPrior.scale_moments

    def __repr__(self):
        return (
            f"RegularizedHorseshoe(tau0={self.tau0:g}, slab_scale={self.slab_scale:g}, "
            f"slab_df={self.slab_df:g})"
        )
