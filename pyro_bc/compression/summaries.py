"""Posterior summaries of a Bayesian layer: the pruning quantity, ``E[w]`` and ``Var[w]``.

With ``w = z theta``, ``z`` the group scale and ``theta ~ N(mu, sigma^2)`` under the guide:
``E[w] = E[z] mu`` and ``Var[w] = E[z]^2 sigma^2 + Var[z] (mu^2 + sigma^2)``, with ``z``
broadcast along the layer's group dimension (``docs/method.md#posterior-summaries``). A
convolution's scale multiplies its bias too, so its bias mean is ``E[z] mu_b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributions import unwrap


@dataclass
class LayerSummary:
    """The posterior summaries of one layer; weights in float64, shaped like the layer's weights.

    Example::

        summary = summarise(model.fc1, guide.distributions())
        summary.log_alpha.shape, summary.weight_mean.shape  # (784,), (300, 784)
    """

    log_alpha: torch.Tensor
    weight_mean: torch.Tensor
    weight_var: torch.Tensor
    bias_mean: torch.Tensor | None


def _normal_of(posteriors, site):
    if site not in posteriors:
        raise ValueError(
            f"compress: the guide has no distribution for site {site!r}; was it built for "
            "this model (pyro_bc.StructuredGuide(model))?"
        )
    base = unwrap(posteriors[site])
    if not isinstance(base, torch.distributions.Normal):
        raise ValueError(
            f"compress: site {site!r} has a {type(base).__name__} posterior; compress needs "
            "a Normal for weights and biases"
        )
    return base.loc.detach().double(), base.variance.detach().double()


@torch.no_grad()
def summarise(layer, posteriors: dict) -> LayerSummary:
    """The :class:`LayerSummary` of ``layer`` under the guide's ``posteriors`` (site -> dist).

    Example::

        summarise(model.fc1, guide.distributions()).log_alpha  # one value per input
    """
    name = layer.site()
    mean_z, var_z = layer.prior.scale_moments(name, layer.num_groups, posteriors)
    log_alpha = layer.prior.log_dropout_rate(name, layer.num_groups, posteriors).detach()
    if torch.isnan(log_alpha).any():
        bad = torch.isnan(log_alpha).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"compress: the pruning quantity of layer {name!r} is NaN for groups {bad}; "
            "the guide's scale parameters are NaN or degenerate. Check the training run."
        )
    mu, sigma2 = _normal_of(posteriors, layer.site("weight"))
    mean_z = layer.group_view(mean_z.detach().double())
    var_z = layer.group_view(var_z.detach().double())
    weight_mean = mean_z * mu
    weight_var = mean_z.pow(2) * sigma2 + var_z * (mu.pow(2) + sigma2)
    bias_mean = None
    if layer.has_bias:
        bias_mean, _ = _normal_of(posteriors, layer.site("bias"))
        if layer.group_dim == 0:  # the scale multiplies the outputs, bias included
            bias_mean = bias_mean * mean_z.flatten()
    bias_mean = None if bias_mean is None else bias_mean.cpu()
    return LayerSummary(log_alpha.cpu(), weight_mean.cpu(), weight_var.cpu(), bias_mean)
