"""``TraceMeanField_ELBO`` that computes only the log-densities its loss uses.

Pyro's estimator scores every site of both traces before it looks for closed-form KLs, so for a
Bayesian network it evaluates the Normal log-density of every weight twice per step and then
discards both. :class:`MeanFieldELBO` gives the same loss and gradients, computing a site's
log-density only where the loss needs it: observed sites, and latent sites whose KL has no
closed form (Monte Carlo). With Pyro's validation enabled it runs Pyro's own code path, checks
included.
"""

from __future__ import annotations

from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence


def _log_prob_sum(site):
    if "log_prob_sum" not in site:
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["log_prob_sum"] = scale_and_mask(log_prob, site["scale"], site["mask"]).sum()
    return site["log_prob_sum"]


def _latent_sites(trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


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
        elbo = 0.0
        for name, site in _latent_sites(model_trace):
            if site["is_observed"]:
                elbo = elbo + _log_prob_sum(site)
                continue
            guide_site = guide_trace.nodes[name]
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                elbo = elbo + _log_prob_sum(site) - _log_prob_sum(guide_site)
            else:
                kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
                elbo = elbo - kl.sum()
        for name, guide_site in _latent_sites(guide_trace):
            if name not in model_trace.nodes:  # auxiliary guide sites
                elbo = elbo - _log_prob_sum(guide_site)
        return -elbo

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._negative_elbo(model_trace, guide_trace)
        loss = loss / self.num_particles
        warn_if_nan(loss, "loss")
        return loss
