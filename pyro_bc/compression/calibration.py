"""Calibration: the mean input of every Bayesian layer, to replace pruned inputs by their means.

A pruned input that is constant but not zero (an MNIST border pixel scaled to -1, say) takes its
weights' mean effect with it when it is dropped. With the mean input ``m_i`` of each layer,
measured on the dense posterior-mean network over training data, compression adds
``E[w_ji] m_i`` of each pruned input ``i`` to the bias of unit ``j`` instead (for a convolution,
the channel's mean over examples and positions times the sum of the filter's taps, exact away
from zero padding).
"""

from __future__ import annotations

import torch

from ..nn import BayesianLayer
from .chain import DROPPED


@torch.no_grad()
def input_means(chain, summaries: dict, loader) -> tuple[dict, int]:
    """The mean input of each Bayesian layer of the dense posterior-mean network over
    ``loader`` (per feature for dense layers, per channel for convolutions), keyed by site, and
    the number of examples.

    Example::

        means, n = input_means(trace_chain(guide), summaries, train_loader)
        means["fc1"].shape  # (784,)
    """
    layers = [link.module for link in chain if isinstance(link.module, BayesianLayer)]
    # where the model is: a thinned posterior's Gather modules hold their index there
    device = layers[0]._zero.device if layers else torch.device("cpu")
    steps = []  # (site of a Bayesian layer or None, the module computing the next input)
    for link in chain:
        module = link.module
        if isinstance(module, BayesianLayer):
            summary = summaries[module.site()]
            bias = None if summary.bias_mean is None else summary.bias_mean.float()
            layer = module.plain_layer(summary.weight_mean.float(), bias).to(device)
            steps.append((module.site(), layer))
        elif not isinstance(module, DROPPED):
            steps.append((None, module))
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    sums, seen = {}, 0
    for x, _ in loader:
        x = x.to(device)
        seen += len(x)
        for site, module in steps:
            if site is not None:
                x_sum = x.to(sum_dtype)
                total = x_sum.sum(0) if x.dim() == 2 else x_sum.mean((2, 3)).sum(0)
                sums[site] = sums.get(site, 0) + total
            x = module(x)
    if not seen:
        raise ValueError("compress: the calibration loader yielded no examples")
    return {site: (total / seen).cpu().double() for site, total in sums.items()}, seen
