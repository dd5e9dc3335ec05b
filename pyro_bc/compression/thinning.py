"""Thinning: the kept rows, columns and filters of each layer, quantized, as a plain network.

Each Bayesian layer becomes an ordinary torch layer (``layer.plain_layer``) holding the posterior
means of its kept weights, rounded to its fixed-point grid, with a
:class:`~pyro_bc.gather.Gather` in front where it reads only some of the features it is given.
Deterministic modules are copied; Identity and Dropout (the identity at inference) are left out.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from ..compressed import CompressedNetwork
from ..fixed_point import MAX_WIDTH, dequantize, quantize
from ..gather import Gather
from ..nn import BayesianLayer
from .chain import DROPPED, SELECTION


def kept_parameters(summary, plan, input_mean=None):
    """The kept weight means (float32), their variances (float64) and the kept bias means
    (float32), with the mean contribution of the pruned inputs folded into the bias when the
    layer's ``input_mean`` is given (:mod:`pyro_bc.compression.calibration`).

    Example::

        weight, var, bias = kept_parameters(summaries["fc1"], plans["fc1"], means["fc1"])
    """
    rows, cols = plan.out_keep, plan.in_keep
    weight = summary.weight_mean[rows][:, cols].float()
    var = summary.weight_var[rows][:, cols]
    if summary.bias_mean is None:
        return weight, var, None
    bias = summary.bias_mean[rows]
    if input_mean is not None:
        dropped = summary.weight_mean[rows][:, ~cols]
        taps = dropped.flatten(2).sum(-1) if dropped.dim() > 2 else dropped
        bias = bias + taps @ input_mean[~cols]
    return weight, var, bias.float()


def quantized_weight(site, weight, t):
    """``weight`` rounded to the grid ``2^-t`` and the width of its integers (32 for float32).

    Example::

        weight, width = quantized_weight("fc1", weight, 5)
    """
    if t is None:
        return weight, 32
    q, width = quantize(weight, t)
    if width > MAX_WIDTH:
        raise ValueError(
            f"compress: layer {site!r} has weights up to {weight.abs().max().item():.3g}, which "
            f"need {width} > {MAX_WIDTH} bits with {t} fraction bits; use fewer bits for it "
            "(bits={...})"
        )
    return dequantize(q, t), width


def thin(chain, plans, kept, frac_bits, input_shape) -> tuple[CompressedNetwork, dict]:
    """The compressed network and each layer's fixed-point width.

    :param kept: ``{site: (weight, var, bias)}`` from :func:`kept_parameters`.
    :param frac_bits: ``{site: t or None}``.

    Example::

        network, widths = thin(chain, plans, kept, {"fc1": 5, "fc2": 6}, (784,))
    """
    modules, formats, widths = OrderedDict(), {}, {}
    for link in chain:
        module, key = link.module, link.name.replace(".", "_")
        if isinstance(module, DROPPED + SELECTION):
            continue  # a Gather of the chain is part of the next layer's plan
        if not isinstance(module, BayesianLayer):
            modules[key] = copy.deepcopy(module)
            continue
        site = module.site()
        plan, t = plans[site], frac_bits[site]
        if plan.gather is not None:
            modules[_unique(f"{key}_gather", modules)] = Gather(plan.gather, plan.gather_from)
        weight, _, bias = kept[site]
        _check_finite(site, weight, bias)
        weight, widths[site] = quantized_weight(site, weight, t)
        modules[key], formats[key] = module.plain_layer(weight, bias), t
    network = CompressedNetwork(modules, input_shape=input_shape, formats=formats)
    return network.eval(), widths


def _check_finite(site, weight, bias):
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise ValueError(
            f"compress: the posterior means of layer {site!r} are not all finite; check the "
            "training run"
        )


def _unique(name, taken):
    while name in taken:
        name += "_"
    return name
