"""``TraceMeanField_ELBO`` that computes only the log-densities its loss uses.

Pyro's estimator scores every site of both traces before it looks for closed-form KLs, so for a
Bayesian network it evaluates the Normal log-density of every weight twice per step and then
discards both. :class:`MeanFieldELBO` gives the same loss and gradients, computing a site's
log-density only where the loss needs it: observed sites, and latent sites whose KL has no
closed form (Monte Carlo). With Pyro's validation enabled it runs Pyro's own code path, checks
included.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import is_identically_one, scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import Independent, kl_divergence


def _log_prob_sum(site):
    if "log_prob_sum" not in site:
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["log_prob_sum"] = scale_and_mask(log_prob, site["scale"], site["mask"]).sum()
    return site["log_prob_sum"]


def _latent_sites(trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _kl_sum(guide_site, model_site):
    """``KL(q || p)`` of a site, scaled, masked and summed; raises NotImplementedError when there
    is no closed form."""
    q, p = guide_site["fn"], model_site["fn"]
    scale, mask = guide_site["scale"], guide_site["mask"]
    if mask is None and is_identically_one(scale):
        # Pyro's Independent || Independent rule sums the event dimensions and the loss sums the
        # rest: summing once over the base distributions' KL is the same number, in fewer ops.
        while (
            isinstance(q, Independent)
            and isinstance(p, Independent)
            and q.reinterpreted_batch_ndims == p.reinterpreted_batch_ndims
        ):
            q, p = q.base_dist, p.base_dist
    kl = scale_and_mask(kl_divergence(q, p), scale, mask)
    if torch.is_tensor(kl):
        return kl.sum()
    return kl * guide_site["fn"].batch_shape.numel()


class MeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` with log-densities computed only where the loss uses them.

    The same estimator: closed-form KLs where registered, Monte Carlo ``log p - log q`` for the
    other latent sites (which must be reparameterized), log-likelihood of the observed sites.

    Example::

        loss = MeanFieldELBO().differentiable_loss(model, guide, x, y)
    """

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        surrogate = self._negative_elbo(model_trace, guide_trace)
        return torch_item(surrogate), surrogate

    def _negative_elbo(self, model_trace, guide_trace):
        # Terms of the negative ELBO, added once at the end: one autograd node, not one per site.
        terms = []
        for name, site in _latent_sites(model_trace):
            if site["is_observed"]:
                terms.append(-_log_prob_sum(site))
                continue
            guide_site = guide_trace.nodes[name]
            try:
                terms.append(_kl_sum(guide_site, site))
            except NotImplementedError:
                terms.append(_log_prob_sum(guide_site) - _log_prob_sum(site))
        for name, guide_site in _latent_sites(guide_trace):
            if name not in model_trace.nodes:  # auxiliary guide sites
                terms.append(_log_prob_sum(guide_site))
        tensors = [t for t in terms if torch.is_tensor(t)]
        constant = sum(t for t in terms if not torch.is_tensor(t))
        if not tensors:
            return torch.as_tensor(float(constant))
        return torch.stack(tensors).sum() + constant

    def differentiable_loss(self, model, guide, *args, **kwargs):
        losses = [
            self._negative_elbo(model_trace, guide_trace)
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs)
        ]
        loss = losses[0] if len(losses) == 1 else sum(losses) / len(losses)
        warn_if_nan(loss, "loss")
        return loss
