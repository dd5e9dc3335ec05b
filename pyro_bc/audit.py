"""
Which latent sites get a closed-form KL under :class:`~pyro.infer.TraceMeanField_ELBO`?

``TraceMeanField_ELBO`` silently falls back to a Monte Carlo estimate ``log p(z) - log q(z)``
wherever :func:`torch.distributions.kl_divergence` raises :class:`NotImplementedError`. A
fallback still trains, but noisily (and for an
:class:`~pyro_bc.distributions.ImproperLogUniform` prior its loss is offset by a constant from
the closed form's). :func:`kl_audit` makes the decision
visible; :func:`assert_closed_form` turns a fallback into an error.
"""

import dataclasses
import warnings

import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

__all__ = ["KLAudit", "KLSiteRecord", "assert_closed_form", "kl_audit"]


@dataclasses.dataclass(frozen=True)
class KLSiteRecord:
    """
    How ``TraceMeanField_ELBO`` treats the KL term of one latent site.

    :ivar str name: The sample site's name.
    :ivar str guide_dist: The guide's distribution, e.g. ``"Independent(Normal, 1)"``.
    :ivar str model_dist: The model's distribution, e.g. ``"Independent(Gamma, 1)"``.
    :ivar bool closed_form: True if ``kl_divergence(guide_fn, model_fn)`` is registered, False
        if the ELBO falls back to Monte Carlo.
    :ivar float kl: The site's closed-form KL, summed and with the site's ``scale`` and ``mask``
        applied (its contribution to the loss), or None for a Monte Carlo site.
    """

    name: str
    guide_dist: str
    model_dist: str
    closed_form: bool
    kl: float | None = None


class KLAudit(list):
    """
    A list of :class:`KLSiteRecord`, one per latent site in model order, that prints as a table.

    Example::

        >>> print(kl_audit(model, guide))  # doctest: +SKIP
        site  guide                   model                               kl           value
        z     Independent(Normal, 1)  Independent(ImproperLogUniform, 1)  closed form  8.81687
        s     LogNormal               HalfCauchy                          Monte Carlo  -
    """

    @property
    def monte_carlo_sites(self):
        """Names of the sites whose KL is estimated by Monte Carlo."""
        return [r.name for r in self if not r.closed_form]

    def __str__(self):
        header = ("site", "guide", "model", "kl", "value")
        rows = [header] + [
            (
                r.name,
                r.guide_dist,
                r.model_dist,
                "closed form" if r.closed_form else "Monte Carlo",
                "-" if r.kl is None else f"{r.kl:.6g}",
            )
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        return "\n".join(lines)


def _describe(fn):
    # Show the wrappers, since KL dispatch depends on them as much as on the base class.
    if isinstance(fn, Independent):
        return f"Independent({_describe(fn.base_dist)}, {fn.reinterpreted_batch_ndims})"
    if isinstance(fn, MaskedDistribution):
        return f"Masked({_describe(fn.base_dist)})"
    if isinstance(fn, ExpandedDistribution):
        return f"Expanded({_describe(fn.base_dist)})"
    return type(fn).__name__


def kl_audit(model, guide, *args, **kwargs):
    """
    Reports, for every latent site, whether ``TraceMeanField_ELBO`` uses a closed-form KL.

    The decision is made the way the ELBO makes it: trace the guide, replay the model against
    it, and for each non-observed sample site of the model try
    ``torch.distributions.kl_divergence(guide_fn, model_fn)``; :class:`NotImplementedError`
    means the ELBO will use Monte Carlo. Running the guide creates its parameters in Pyro's
    param store, as an ELBO evaluation would.

    Example::

        def model():
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("s", dist.HalfCauchy(1.0))

        def guide():
            pyro.sample("z", dist.Normal(pyro.param("z_loc", torch.tensor(0.0)), 1.0))
            pyro.sample("s", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.0)), 1.0))

        audit = kl_audit(model, guide)
        print(audit)                    # a table
        audit.monte_carlo_sites         # ["s"]

    :param callable model: A Pyro model.
    :param callable guide: A guide for ``model``.
    :param args: Positional arguments of ``model`` and ``guide``.
    :param kwargs: Keyword arguments of ``model`` and ``guide``.
    :returns: One :class:`KLSiteRecord` per latent site, in model order.
    :rtype: KLAudit
    """
    with torch.no_grad():
        guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        model_trace = prune_subsample_sites(model_trace)

        records = KLAudit()
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample" or model_site["is_observed"]:
                continue
            if name not in guide_trace.nodes:
                raise ValueError(f"Latent site '{name}' of the model is missing from the guide.")
            guide_site = guide_trace.nodes[name]
            guide_fn, model_fn = guide_site["fn"], model_site["fn"]
            try:
                kl = kl_divergence(guide_fn, model_fn)
            except NotImplementedError:
                closed_form, value = False, None
            else:
                kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
                if torch.is_tensor(kl):
                    value = kl.sum().item()
                else:  # e.g. 0.0 from a fully masked site
                    value = float(kl) * guide_fn.batch_shape.numel()
                closed_form = True
            records.append(
                KLSiteRecord(name, _describe(guide_fn), _describe(model_fn), closed_form, value)
            )
    return records


def assert_closed_form(model, guide, *args, warn=False, **kwargs):
    """
    Raises (or warns) if ``TraceMeanField_ELBO`` would estimate any KL term by Monte Carlo.

    Example::

        audit = assert_closed_form(model, guide, x, y)  # ValueError naming the sites, if any

    :param callable model: A Pyro model.
    :param callable guide: A guide for ``model``.
    :param args: Positional arguments of ``model`` and ``guide``.
    :param bool warn: Issue a :class:`UserWarning` instead of raising.
    :param kwargs: Keyword arguments of ``model`` and ``guide``.
    :returns: The audit, as from :func:`kl_audit`.
    :rtype: KLAudit
    :raises ValueError: If some site has no registered closed-form KL (and ``warn`` is False).
    """
    audit = kl_audit(model, guide, *args, **kwargs)
    fallback = [r for r in audit if not r.closed_form]
    if fallback:
        pairs = ", ".join(f"'{r.name}' ({r.guide_dist} || {r.model_dist})" for r in fallback)
        message = (
            f"TraceMeanField_ELBO would use Monte Carlo for the KL of site(s) {pairs}. "
            "Register a closed form with torch.distributions.kl.register_kl(GuideType, "
            "ModelType), or change the guide or prior of these sites."
        )
        if not warn:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return audit
