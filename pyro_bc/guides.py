"""Structured guides ``q(z) q(theta)`` for networks of :mod:`pyro_bc.nn` layers.

For every Bayesian layer the guide holds one factor per site of the layer's prior, a Normal for
the weights ``theta`` and one for the bias. Because the weights are non-centred
(``w = z * theta``), this is the paper's ``q(z) q(w | z)`` with ``q(w | z) = N(z mu, z^2 sigma^2)``.

Every factor is a Normal with a mean ``loc`` and a log-variance ``log_var``, mapped into its
site's support: a **guide family** (:class:`GuideFamily`). The family of a prior's site is the
prior's choice (:meth:`pyro_bc.priors.GroupPrior.guide_family`), by default the one whose support
is the site's: ``"normal"`` on the real line, ``"lognormal"`` on ``(0, inf)``, ``"logitnormal"`` on
``(0, 1)``. :func:`register_guide_family` adds others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import biject_to, constraints, kl_divergence

from .checks import is_number
from .distributions import LogitNormal, NormalLogVar
from .nn import SCALE_ROLE, WEIGHT_ROLE, BayesianLayer
from .priors import on_device


@dataclasses.dataclass(frozen=True)
class GuideFamily:
    """A family of guide factors: ``N(loc, exp(log_var))`` mapped into ``support``.

    :ivar name: what a prior's :meth:`~pyro_bc.priors.GroupPrior.guide_family` returns.
    :ivar distribution: ``distribution(loc, log_var)``, a distribution with ``loc``'s batch shape
        whose draws lie in ``support``.
    :ivar support: where its draws lie, as ``(lower, upper)`` bounds; the family fits a site
        whose support contains these bounds, and is the default where they are the same.
    :ivar default_loc: the ``loc`` a factor starts at, unless the prior's
        :meth:`~pyro_bc.priors.GroupPrior.guide_init` says otherwise.

    Example::

        GUIDE_FAMILIES["logitnormal"].distribution(torch.zeros(3), torch.zeros(3)).rsample()
    """

    name: str
    distribution: Callable
    support: tuple
    default_loc: float = 0.0


def _standard_deviation(log_var):
    return (0.5 * log_var).exp()


#: the guide families by name, in the order the defaults are looked up
GUIDE_FAMILIES: dict[str, GuideFamily] = {
    family.name: family
    for family in (
        # a real-valued site of a pyro_bc prior is a scale (the normal-Jeffreys prior's): at 1
        GuideFamily("normal", NormalLogVar, (-math.inf, math.inf), default_loc=1.0),
        GuideFamily(
            "lognormal",
            lambda loc, log_var: dist.LogNormal(loc, _standard_deviation(log_var)),
            (0.0, math.inf),
        ),
        GuideFamily(
            "logitnormal",
            lambda loc, log_var: LogitNormal(loc, _standard_deviation(log_var)),
            (0.0, 1.0),
        ),
    )
}


BUILT_IN_FAMILIES = frozenset(GUIDE_FAMILIES)


def register_guide_family(
    name: str, transform, support, *, default_loc: float = 0.0
) -> GuideFamily:
    """Adds a guide family: a Normal pushed through ``transform`` (a bijection from the real
    line onto ``support``, or a list of transforms applied in order).

    ``support`` is a constraint with bounds (``constraints.interval(0.0, 2.0)``,
    ``constraints.positive``, ...). A prior picks the family by name in
    :meth:`~pyro_bc.priors.GroupPrior.guide_family`; it is also the default for sites with this
    support that no earlier family has. Closed-form KLs are whatever
    ``torch.distributions.kl_divergence`` knows for the resulting ``TransformedDistribution``
    (:func:`pyro_bc.kl_audit` shows which sites fall back to Monte Carlo).

    Example::

        from torch.distributions import constraints
        from torch.distributions.transforms import AffineTransform, SigmoidTransform

        # for a prior such as dist.Uniform(0.0, 2.0)
        register_guide_family(
            "logitnormal_0_2",
            [SigmoidTransform(), AffineTransform(0.0, 2.0)],
            constraints.interval(0.0, 2.0),
        )
    """
    if name in BUILT_IN_FAMILIES:
        raise ValueError(
            f"register_guide_family: {name!r} is a built-in family ({sorted(BUILT_IN_FAMILIES)}); "
            "give yours another name"
        )
    transforms = list(transform) if isinstance(transform, (list, tuple)) else [transform]
    bounds = support_bounds(support)
    if bounds is None:
        raise ValueError(
            f"register_guide_family({name!r}): support {support} has no bounds; give an "
            "interval, a half-line or the real line (torch.distributions.constraints)"
        )
    if not transforms or any(t.domain.event_dim or t.codomain.event_dim for t in transforms):
        raise ValueError(
            f"register_guide_family({name!r}): give elementwise transforms (event_dim 0), "
            f"got {transforms}"
        )

    def distribution(loc, log_var):
        return dist.TransformedDistribution(
            dist.Normal(loc, _standard_deviation(log_var)), transforms
        )

    family = GuideFamily(name, distribution, bounds, default_loc)
    GUIDE_FAMILIES[name] = family
    return family


def support_bounds(support):
    """``(lower, upper)`` of a real interval-like constraint, or None for other supports.

    Example::

        support_bounds(dist.Beta(1.0, 1.0).support)  # (0.0, 1.0)
    """
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.real or isinstance(support, type(constraints.real)):
        return (-math.inf, math.inf)
    lower = getattr(support, "lower_bound", -math.inf)
    upper = getattr(support, "upper_bound", math.inf)
    kinds = (
        constraints.greater_than,
        constraints.greater_than_eq,
        constraints.less_than,
        constraints.interval,
        constraints.half_open_interval,
    )
    if not isinstance(support, kinds):
        return None
    bounds = []
    for bound in (lower, upper):
        if torch.is_tensor(bound):
            if bound.numel() == 0 or bool((bound != bound.flatten()[0]).any()):
                return None  # bounds that differ between elements
            bound = bound.flatten()[0].item()
        bounds.append(float(bound))
    return tuple(bounds)


def choose_family(prior, site: str, support) -> GuideFamily:
    """The guide family of ``site``: the prior's choice, or the default for its support.

    :raises ValueError: naming the site, if the prior names an unknown family or one whose draws
        leave the support, or if no family has the site's support.

    Example::

        choose_family(GroupHorseshoe(), "fc1.local_a", dist.Gamma(0.5, 1.0).support).name
        # "lognormal"
    """
    bounds = support_bounds(support)
    name = prior.guide_family(site, support)
    if name is None:
        for family in GUIDE_FAMILIES.values():
            if family.support == bounds:
                return family
        raise ValueError(
            f"site {site!r}: StructuredGuide has no default family for support {support}; "
            f"override GroupPrior.guide_family to choose one of {sorted(GUIDE_FAMILIES)} whose "
            "draws lie in it, or add one with pyro_bc.guides.register_guide_family"
        )
    family = GUIDE_FAMILIES.get(name)
    if family is None:
        raise ValueError(
            f"site {site!r}: {prior!r}.guide_family returned {name!r}; known families: "
            f"{sorted(GUIDE_FAMILIES)} (pyro_bc.guides.register_guide_family adds one)"
        )
    if bounds is None or not (bounds[0] <= family.support[0] and family.support[1] <= bounds[1]):
        raise ValueError(
            f"site {site!r}: the {name!r} family draws values in {family.support}, outside the "
            f"site's support {support}; choose a family whose draws lie in it"
        )
    return family


class _SiteShapes(Messenger):
    """Runs a prior without sampling: every site gets a valid placeholder value."""

    def __init__(self):
        super().__init__()
        self.sites = []
        self.distributions = {}

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        shape = fn.shape()
        support = fn.support
        msg["value"] = biject_to(support)(torch.zeros(shape))
        msg["done"] = True
        msg["stop"] = True
        self.sites.append((msg["name"], shape, support, fn.event_dim))
        self.distributions[msg["name"]] = fn


def _run_prior(prior, name, num_groups):
    recorder = _SiteShapes()
    with poutine.block(), recorder:
        prior(name, num_groups)
    return recorder


def prior_sites(prior, name, num_groups):
    """Names, shapes, supports and event dims of the sample sites of ``prior(name, num_groups)``."""
    return _run_prior(prior, name, num_groups).sites


def _has_closed_form_kl(guide_fn, prior_fn):
    try:
        kl_divergence(guide_fn, prior_fn)
    except Exception:
        # whatever the KL cannot do, the ELBO estimates by Monte Carlo from a drawn value
        return False
    return True


class _Factor(nn.Module):
    """One factor of the guide: a :class:`GuideFamily` with mean ``loc`` and log-variance
    ``log_var`` (of the Normal before its map into the support)."""

    def __init__(self, site, loc, log_var, event_dim, family="normal", max_log_var=None):
        super().__init__()
        self.site = site
        self.event_dim = event_dim
        self.family = family
        self.max_log_var = max_log_var
        self.loc = nn.Parameter(loc.detach().clone().float())
        self.log_var = nn.Parameter(log_var.detach().clone().float())
        self.role = None
        # in the support of both families (real and positive), for sites left undrawn
        self.register_buffer("_placeholder", torch.ones_like(self.loc), persistent=False)

    def infer(self):
        """The ``infer`` dict of the factor's sample site."""
        if self.role is None:
            return {}
        return {"bc_role": self.role, "bc_placeholder": self._placeholder}

    def distribution(self):
        log_var = self.log_var
        if self.max_log_var is not None:
            log_var = log_var.clamp(max=self.max_log_var)
        family = GUIDE_FAMILIES[self.family]
        return family.distribution(self.loc, log_var).to_event(self.event_dim)


class LayerPosterior(nn.Module):
    """The guide's factors of one Bayesian layer: its prior's sites, then weight, then bias."""

    def __init__(self, layer: BayesianLayer, clip_var=None):
        super().__init__()
        self.name = layer.site()
        self.scale_factors = nn.ModuleList()
        prior = _run_prior(layer.prior, self.name, layer.num_groups)
        for site, shape, support, event_dim in prior.sites:
            init = layer.prior.guide_init(site, shape) or {}
            family = choose_family(layer.prior, site, support)
            loc = init.get("loc", torch.full(shape, family.default_loc))
            log_var = init.get("log_var", torch.full(shape, -9.0))
            factor = _Factor(site, loc, log_var, event_dim, family.name)
            if _has_closed_form_kl(factor.distribution(), prior.distributions[site]):
                factor.role = SCALE_ROLE
            self.scale_factors.append(factor)

        fan_in = math.prod(layer.weight_shape[1:])
        max_log_var = None if clip_var is None else math.log(clip_var)
        self.weight = _Factor(
            layer.site("weight"),
            torch.randn(layer.weight_shape) / math.sqrt(fan_in),
            torch.full(layer.weight_shape, -9.0) + 0.01 * torch.randn(layer.weight_shape),
            len(layer.weight_shape),
            max_log_var=max_log_var,
        )
        self.bias = None
        if layer.has_bias:
            self.bias = _Factor(
                layer.site("bias"),
                torch.zeros(layer.bias_shape),
                torch.full(layer.bias_shape, -9.0) + 0.01 * torch.randn(layer.bias_shape),
                1,
            )

    def distributions(self):
        """Site name -> guide distribution, in the model's order."""
        factors = [*self.scale_factors, self.weight] + ([self.bias] if self.bias else [])
        return {f.site: f.distribution() for f in factors}

    def forward(self):
        for factor in self.scale_factors:
            pyro.sample(factor.site, factor.distribution(), infer=factor.infer())
        infer = {"bc_role": WEIGHT_ROLE}
        pyro.sample(self.weight.site, self.weight.distribution(), infer=infer)
        if self.bias is not None:
            pyro.sample(self.bias.site, self.bias.distribution(), infer=infer)


class StructuredGuide(nn.Module):
    """The paper's structured posterior ``q(z) q(theta)`` for every Bayesian layer of ``model``.

    :param model: a :class:`~pyro_bc.nn.BayesianNetwork` (or any module whose Bayesian layers run
        in registration order).
    :param clip_var: maximum variance of the weights ``theta``: a number for every layer or a
        dict ``{layer name: number}`` (the authors clip fc1 of LeNet-300-100 at 0.04).

    Calling the guide samples every latent site; call it with the model's arguments. Its
    parameters are ordinary ``nn.Parameter`` s, so any ``torch.optim`` optimizer trains them
    (:func:`pyro_bc.fit` does), and calling it registers them in Pyro's param store, so
    ``pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())``
    trains them too.

    Example::

        model = LeNet300100(prior=GroupNormalJeffreys(), dataset_size=60_000)
        guide = StructuredGuide(model, clip_var={"fc1": 0.04})
        loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    """

    def __init__(self, model, clip_var=None):
        super().__init__()
        # Kept out of the module tree so the guide's state_dict holds only its own parameters.
        self.__dict__["model"] = model
        layers = [m for m in model.modules() if isinstance(m, BayesianLayer)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no pyro_bc Bayesian layers to guide")
        if not isinstance(clip_var, dict):
            clip_var = {layer.site(): clip_var for layer in layers}
        for site, value in clip_var.items():
            if value is not None and not (is_number(value) and 0 < value < math.inf):
                raise ValueError(
                    f"StructuredGuide: clip_var for {site!r} must be a positive variance or None, "
                    f"got {value!r}"
                )
        unknown = set(clip_var) - {layer.site() for layer in layers}
        if unknown:
            raise ValueError(f"clip_var names layers the model does not have: {sorted(unknown)}")
        posteriors = []
        for layer in layers:
            # the factors start on the layer's device, the prior's constants too
            with on_device(layer._zero.device):
                posteriors.append(LayerPosterior(layer, clip_var.get(layer.site())))
        self.layers = nn.ModuleList(posteriors)

    def forward(self, *args, **kwargs):
        # Registering the parameters lets pyro.infer.SVI with a pyro.optim optimizer find them;
        # the name is unique so that two guides never share entries of the param store.
        pyro.module(f"StructuredGuide_{id(self):x}", self)
        self.sample()

    def sample(self, *args, **kwargs):
        """Samples every latent site without touching Pyro's param store (:func:`pyro_bc.fit`
        optimizes the parameters directly).

        Example::

            guide_trace = pyro.poutine.trace(guide.sample).get_trace()
        """
        for layer in self.layers:
            layer()

    def distributions(self):
        """Site name -> guide distribution for every latent site, in the model's order."""
        return {name: d for layer in self.layers for name, d in layer.distributions().items()}

    @torch.no_grad()
    def init_from(self, network: nn.Module, rescale: bool = False):
        """Sets the weight means so the posterior-mean weights equal a trained network's.

        ``network`` is a plain network with the same layer names (e.g. the model's
        ``deterministic()`` twin, trained): ``nn.Linear`` for dense and ``nn.Conv2d`` for conv
        layers. The paper's "compress a trained network" workflow starts here.

        A conv layer with batch norm reads it from the module registered right after its
        ``nn.Conv2d`` (an ``nn.BatchNorm2d``, e.g. ``conv1`` then ``bn1``) and sets the model's
        batch norm, a point estimate, so that in eval mode the posterior-mean layer equals the
        trained pair: the trained conv's bias moves into the running mean, and ``E[z]`` is
        divided out of the batch norm's affine parameters (batch norm normalises ``theta``'s
        magnitude away in training, so the group scale keeps its initial value).

        With ``rescale=True`` each group's scale starts at the root mean square of the group's
        trained weights (:meth:`GroupPrior.set_guide_scale`), so ``theta``'s means have unit
        root mean square, where its ``N(0, 1)`` prior puts them (with batch norm, the running
        statistics take up that factor instead of the scale); a Normal factor's variance moves
        with its mean, so the pruning quantity ``log(Var[z] / E[z]^2)`` starts where it would
        at scale 1. Otherwise the group scales keep
        their initial values (1 for the built-in priors) and ``theta`` carries the trained
        weights' magnitude; the horseshoe then has to move that magnitude into its scales while
        it trains, and prunes groups the data need on the way.

        Example::

            guide.init_from(trained_lenet, rescale=True)
        """
        bayesian = {m.site(): m for m in self.model.modules() if isinstance(m, BayesianLayer)}
        for posterior in self.layers:
            layer = bayesian[posterior.name]
            try:
                source = network.get_submodule(posterior.name)
            except AttributeError as e:
                raise ValueError(
                    f"init_from: {type(network).__name__} has no layer {posterior.name!r}"
                ) from e
            weight = getattr(source, "weight", None)
            if weight is not None:
                weight = weight.to(posterior.weight.loc.device)
            if weight is None or weight.shape != layer.weight_shape:
                raise ValueError(
                    f"init_from: layer {posterior.name!r} needs a weight of shape "
                    f"{tuple(layer.weight_shape)}, got "
                    f"{None if weight is None else tuple(weight.shape)}"
                )
            if getattr(layer, "batch_norm", None) is not None:
                _init_batch_norm_layer(layer, posterior, network, weight, source, rescale)
                continue
            if rescale:
                group_dims = [d for d in range(weight.dim()) if d != layer.group_dim]
                rms = weight.detach().pow(2).mean(group_dims).sqrt().clamp(min=1e-6)
                _set_guide_scale(layer.prior, posterior, rms)
            scale_posteriors = {f.site: f.distribution() for f in posterior.scale_factors}
            mean_z, _ = layer.prior.scale_moments(
                posterior.name, layer.num_groups, scale_posteriors
            )
            mean_z = layer.group_view(mean_z)
            posterior.weight.loc.copy_(weight / mean_z)
            if posterior.bias is not None and getattr(source, "bias", None) is not None:
                bias = source.bias.to(posterior.bias.loc.device)
                if layer.group_dim == 0:  # the scale multiplies the bias too
                    bias = bias / mean_z.reshape(-1)
                posterior.bias.loc.copy_(bias)
        return self


def _set_guide_scale(prior, posterior, scale):
    """The prior's :meth:`~pyro_bc.priors.GroupPrior.set_guide_scale`, keeping the relative
    spread of every Normal factor it moves.

    A Normal factor's ``log_var`` is absolute: moving its mean from 1 to a trained layer's root
    mean square weight (say 0.03) with the variance left at ``exp(-9)`` would raise
    ``log(Var[z] / E[z]^2)`` from -9 to about -2, past the pruning threshold before any training.
    Log-normal and logit-normal factors are spread in the unconstrained space already.
    """
    locs = {f.site: f.loc.data for f in posterior.scale_factors}
    before = {site: loc.clone() for site, loc in locs.items()}
    prior.set_guide_scale(posterior.name, locs, scale)
    for factor in posterior.scale_factors:
        if factor.family != "normal":
            continue
        ratio = (factor.loc.data / before[factor.site]).abs()
        shift = torch.where(torch.isfinite(ratio.log()), 2 * ratio.log(), 0.0)
        factor.log_var.data.add_(shift)


def _next_module(network, name):
    """The module registered right after ``name`` in its parent, or None."""
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    names = list(parent._modules)
    following = names.index(child) + 1
    return parent._modules[names[following]] if following < len(names) else None


def _init_batch_norm_layer(layer, posterior, network, weight, conv, rescale):
    name = posterior.name
    trained = _next_module(network, name)
    if (
        not isinstance(trained, nn.BatchNorm2d)
        or trained.num_features != layer.out_channels
        or not trained.track_running_stats
    ):
        raise ValueError(
            f"init_from: layer {name!r} has batch norm, so {type(network).__name__} must follow "
            f"its conv {name!r} by an nn.BatchNorm2d({layer.out_channels}) with running "
            f"statistics; got {trained!r}"
        )
    weight = weight.detach()
    mean = trained.running_mean.detach().clone()
    var = trained.running_var.detach().clone()
    ones = torch.ones_like(mean)
    gamma = trained.weight.detach() if trained.affine else ones
    beta = trained.bias.detach() if trained.affine else torch.zeros_like(mean)
    if getattr(conv, "bias", None) is not None:
        # a bias in front of batch norm only shifts the mean it subtracts
        mean = mean - conv.bias.detach()
    slope = gamma / (var + trained.eps).sqrt()
    rms = ones
    if rescale:
        rms = weight.pow(2).mean((1, 2, 3)).sqrt().clamp(min=1e-6)
        weight = weight / rms[:, None, None, None]
        mean, var = mean / rms, var / rms.pow(2)
    target = layer.batch_norm
    scale_posteriors = {f.site: f.distribution() for f in posterior.scale_factors}
    mean_z, _ = layer.prior.scale_moments(name, layer.num_groups, scale_posteriors)
    posterior.weight.loc.copy_(weight)
    target.running_mean.copy_(mean)
    target.running_var.copy_(var)
    # in eval mode E[z] (gamma' (h' - mean) / sqrt(var + eps') + beta') is the trained map of h
    target.weight.copy_(slope * rms * (var + target.eps).sqrt() / mean_z)
    target.bias.copy_(beta / mean_z)
    target.num_batches_tracked.copy_(trained.num_batches_tracked)
