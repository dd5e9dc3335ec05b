"""``TraceMeanField_ELBO`` that computes only the log-densities its loss uses.

Pyro's estimator scores every site of both traces before it looks for closed-form KLs, so for a
Bayesian network it evaluates the Normal log-density of every weight twice per step and then
discards both. :class:`MeanFieldELBO` gives the same loss and gradients, computing a site's
log-density only where the loss needs it: observed sites, and latent sites whose KL has no
closed form (Monte Carlo). With Pyro's validation enabled it runs Pyro's own code path, checks
included.

:func:`one_pass_negative_elbo` computes the same loss from one run of the guide and one of the
model under a single messenger (the hot path of :func:`pyro_bc.fit`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.util import is_identically_one, scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import Independent, kl_divergence

from .distributions import kl_sum
from .poutine import LocalReparameterizationMessenger


def _log_prob_sum(site):
    if "log_prob_sum" not in site:
        fn, value = site["fn"], site["value"]
        if _is_label_per_row(fn, value) and not (site["args"] or site["kwargs"]):
            # the same numbers as Categorical.log_prob, picked by one op instead of a broadcast,
            # a gather and a squeeze (the logits are normalised)
            log_prob = -F.nll_loss(fn.logits, value, reduction="none", ignore_index=_NO_LABEL)
        else:
            log_prob = fn.log_prob(value, *site["args"], **site["kwargs"])
        site["log_prob_sum"] = scale_and_mask(log_prob, site["scale"], site["mask"]).sum()
    return site["log_prob_sum"]


#: nll_loss skips the targets equal to its ignore_index (-100 by default), where a label out of
#: range must fail as in Categorical.log_prob: an index no label set holds
_NO_LABEL = torch.iinfo(torch.int64).min


def _is_label_per_row(fn, value):
    """A Categorical over the rows of 2-d logits observing one label per row, without argument
    validation (which its own log_prob would do)."""
    return (
        type(fn) is dist.Categorical
        and not fn._validate_args
        and fn.logits.dim() == 2
        and value.dim() == 1
        and value.dtype == torch.int64
        and value.shape[0] == fn.logits.shape[0]
    )


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
        return kl_sum(q, p)
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
        return _sum_terms(terms)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        losses = [
            self._negative_elbo(model_trace, guide_trace)
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs)
        ]
        loss = losses[0] if len(losses) == 1 else sum(losses) / len(losses)
        warn_if_nan(loss, "loss")
        return loss


def _sum_terms(terms):
    tensors = [t for t in terms if torch.is_tensor(t)]
    constant = sum(t for t in terms if not torch.is_tensor(t))
    if not tensors:
        return torch.as_tensor(float(constant))
    return torch.stack(tensors).sum() + constant


class _OnePassELBO(LocalReparameterizationMessenger):
    """Local reparameterization that also replays the guide into the model and adds up the
    negative ELBO while the model runs: the work of ``trace(guide)``, ``trace(replay(model))``
    and :meth:`MeanFieldELBO._negative_elbo` in one messenger, without building traces."""

    def __init__(self):
        super().__init__()
        self.in_model = False
        self.guide_sites = {}  # name -> the guide's message, for replay and the KL
        self.terms = []
        self.logits = None

    def _pyro_sample(self, msg):
        if not self.in_model:
            super()._pyro_sample(msg)  # records the guide's distribution, takes means
            return
        guide_msg = self.guide_sites.get(msg["name"])
        if guide_msg is not None and not msg["is_observed"]:  # what poutine.replay does
            msg["value"] = guide_msg["value"]
            msg["infer"] = guide_msg["infer"]
            msg["done"] = True

    def _pyro_post_sample(self, msg):
        if not self.in_model:
            self.guide_sites[msg["name"]] = msg
            return
        if site_is_subsample(msg):
            return
        guide_msg = self.guide_sites.pop(msg["name"], None)
        if msg["is_observed"]:
            self.terms.append(-_log_prob_sum(msg))
            self.logits = getattr(msg["fn"], "logits", None)
            return
        if guide_msg is None:
            raise NotImplementedError(
                f"one_pass_negative_elbo: the model's latent site {msg['name']!r} is not in the "
                "guide; use MeanFieldELBO"
            )
        # scored after the model has run, as MeanFieldELBO does: a layer's prior runs its sites
        # inside its device context (pyro_bc.priors.on_device), which routes every torch op
        # through a Python mode
        self.terms.append((guide_msg, msg))

    def loss(self):
        terms = []
        for term in self.terms:
            if isinstance(term, tuple):
                guide_msg, msg = term
                try:
                    term = _kl_sum(guide_msg, msg)
                except NotImplementedError:
                    term = _log_prob_sum(guide_msg) - _log_prob_sum(msg)
            terms.append(term)
        for guide_msg in self.guide_sites.values():  # auxiliary guide sites
            if not site_is_subsample(guide_msg):
                terms.append(_log_prob_sum(guide_msg))
        return _sum_terms(terms)


def one_pass_negative_elbo(model, guide, *args, **kwargs):
    """The negative ELBO of :class:`MeanFieldELBO` under local reparameterization (one particle),
    and the logits of the observed site (None if its distribution has none).

    The guide runs, then the model, under one messenger that records the guide's distributions,
    replays its values into the model, answers the layers' ``"preactivation"`` messages
    (:func:`pyro_bc.poutine.local_reparameterization`) and adds up each site's term as the
    model reaches it, in the order :class:`MeanFieldELBO` adds them: the same number, without
    the two traces and the replay handler. The plates inside the model and guide scale and mask
    their sites as usual. It does not check the model and the guide (Pyro's validation), warn on
    NaN, or average particles. It handles what the traces would hold for a model whose every
    latent site is in the guide (raising ``NotImplementedError`` otherwise); enumerated sites
    are not supported. :func:`supports_one_pass` tells from a pair of traces whether it
    applies; :class:`pyro_bc.infer.TrainingStep` checks that on its first step and otherwise
    stays on :class:`MeanFieldELBO`.

    Example::

        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            loss, logits = one_pass_negative_elbo(model, guide.sample, x, y)
    """
    elbo = _OnePassELBO()
    with elbo:
        guide(*args, **kwargs)
        elbo.in_model = True
        model(*args, **kwargs)
    return elbo.loss(), elbo.logits


def supports_one_pass(model_trace, guide_trace) -> bool:
    """Whether :func:`one_pass_negative_elbo` computes the loss of these traces (of
    :class:`MeanFieldELBO` under local reparameterization): every latent model site is in the
    guide, the guide observes nothing, and no site is enumerated.

    Example::

        model_trace, guide_trace = MeanFieldELBO()._get_trace(model, guide, (x, y), {})
        supports_one_pass(model_trace, guide_trace)  # True for pyro_bc's networks
    """
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample" and site["infer"].get("enumerate"):
                return False
    for _, site in _latent_sites(guide_trace):
        if site["is_observed"]:
            return False
    for name, site in _latent_sites(model_trace):
        if not site["is_observed"] and name not in guide_trace.nodes:
            return False
    return True
