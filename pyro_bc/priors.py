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

import pyro
import torch

from .distributions import ImproperLogUniform

MOMENT_SAMPLES = 4096


class GroupPrior:
    """Base class of the built-in priors and the wrapper of user functions.

    Subclasses implement :meth:`__call__` (the Pyro model) and may override :meth:`guide_init`
    (initial values of the guide's parameters for one site) and :meth:`scale_moments` (posterior
    mean and variance of the group scale given the guide's distributions). The defaults work for
    any prior: moments by Monte Carlo through :func:`pyro_bc.poutine.draw_group_scale`.
    """

    def __call__(self, name: str, num_groups: int) -> torch.Tensor:
        raise NotImplementedError

    def guide_init(self, site: str, shape: torch.Size) -> dict | None:
        """Initial ``loc`` and ``log_var`` of the guide at ``site``, or None for the defaults."""
        return None

    def scale_moments(self, name: str, num_groups: int, posteriors: dict):
        """Posterior mean and variance of the group scale, each of shape ``(num_groups,)``.

        ``posteriors`` maps each of this prior's site names to its guide distribution.
        """
        from .poutine import draw_group_scale

        # A fixed seed keeps compression a deterministic function of the guide.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            draws = draw_group_scale(self, name, num_groups, posteriors, MOMENT_SAMPLES)
        return draws.mean(0), draws.var(0)

    def log_dropout_rate(self, name: str, num_groups: int, posteriors: dict) -> torch.Tensor:
        """The pruning quantity: ``log(Var[z] / E[z]^2)`` of the group scale under the guide.

        It is the log of the group's "dropout rate" alpha: large when the scale's posterior is
        mostly noise, so the group is pruned when it exceeds a threshold.
        """
        mean, var = self.scale_moments(name, num_groups, posteriors)
        return var.log() - mean.pow(2).log()

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
        return pyro.sample(f"{name}.scale", ImproperLogUniform().expand([num_groups]).to_event(1))

    def guide_init(self, site, shape):
        return {
            "loc": 1.0 + 0.01 * torch.randn(shape),
            "log_var": -9.0 + 0.01 * torch.randn(shape),
        }

    def scale_moments(self, name, num_groups, posteriors):
        q = _base(posteriors[f"{name}.scale"])
        return q.loc, q.scale.pow(2)


def _base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn
