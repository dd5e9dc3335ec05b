"""The thinned posterior: the smaller Bayesian network and its guide, to train further.

Compression decides which groups go; :func:`thin_posterior` builds the Bayesian network that
keeps only the rest - every Bayesian layer with its kept inputs and outputs, a
:class:`~pyro_bc.gather.Gather` in front of a dense layer that reads only some of its inputs - and
a guide whose factors are the trained ones restricted to the kept groups. Its posterior-mean
network computes what the compressed network computes before quantization, so SVI can go on from
there (retraining after pruning, ``docs/method.md#retraining``) and :func:`~pyro_bc.compress` can
compress it again.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch

from ..gather import Gather
from ..guides import StructuredGuide
from ..nn import BayesianLayer, BayesianNetwork
from .calibration import input_means
from .chain import SELECTION
from .pipeline import analyse


@torch.no_grad()
def thin_posterior(
    guide, thresholds=None, *, calibration=None, input_shape=None
) -> StructuredGuide:
    """The guide of the Bayesian network that keeps only the groups ``thresholds`` keep.

    :param guide: a trained :class:`~pyro_bc.StructuredGuide`.
    :param thresholds: as :func:`~pyro_bc.compress` takes them; the thresholds a compression
        chose are ``{layer.name: layer.threshold for layer in compressed.report.layers}``.
    :param calibration: training batches: as in :func:`~pyro_bc.compress`, a pruned input's
        mean effect moves into the bias of the layer reading it (into the running mean of a
        convolution with batch norm); without it pruned inputs count as zero.
    :returns: a new :class:`~pyro_bc.StructuredGuide`; its ``model`` is a new
        :class:`~pyro_bc.nn.BayesianNetwork` (the chain of the original, thinned, with the same
        priors, ``dataset_size`` and dropout). The original model and guide are not changed.

    Example::

        compressed = pyro_bc.compress(guide, validation=val, max_error_increase=0.005)
        chosen = {layer.name: layer.threshold for layer in compressed.report.layers}
        small = thin_posterior(guide, chosen, calibration=train_loader)
        pyro_bc.fit(small.model, small, train_loader, epochs=5, lr=1e-4)
        recompressed = pyro_bc.compress(small, validation=val, max_error_increase=0.001)
    """
    analysis = analyse(guide, thresholds, input_shape)
    means = {}
    if calibration is not None:
        means, _ = input_means(analysis.chain, analysis.summaries, calibration)
    old_factors = {posterior.name: posterior for posterior in guide.layers}
    modules, thinned, clip_var = OrderedDict(), [], {}
    for link in analysis.chain:
        module, key = link.module, link.name.replace(".", "_")
        if isinstance(module, SELECTION):
            continue  # folded into the next layer's plan.gather
        if not isinstance(module, BayesianLayer):
            modules[key] = copy.deepcopy(module)
            continue
        plan = analysis.plans[module.site()]
        if plan.gather is not None:
            modules[f"{key}_gather"] = Gather(plan.gather, plan.gather_from).to(module._zero.device)
        modules[key] = module.thinned(plan.in_keep, plan.out_keep)
        old = old_factors[module.site()]
        if old.weight.max_log_var is not None:
            clip_var[key] = math.exp(old.weight.max_log_var)
        thinned.append((module, key, plan))
    model = BayesianNetwork(
        modules,
        dataset_size=getattr(analysis.model, "dataset_size", None),
        input_shape=analysis.shape,
    )
    model.train(analysis.model.training)
    small = StructuredGuide(model, clip_var=clip_var or None)
    new_factors = {posterior.name: posterior for posterior in small.layers}
    for layer, key, plan in thinned:
        site = layer.site()
        _copy_factors(layer, plan, old_factors[site], new_factors[key])
        if site in means:
            _fold_pruned_inputs(
                layer,
                model.get_submodule(key),
                plan,
                old_factors[site],
                new_factors[key],
                analysis.summaries[site],
                means[site],
            )
    return small


def _copy_factors(layer, plan, old, new):
    groups = plan.in_keep if layer.group_dim == 1 else plan.out_keep
    for before, after in zip(old.scale_factors, new.scale_factors, strict=True):
        for name in ("loc", "log_var"):
            value = getattr(before, name)
            if value.shape != getattr(after, name).shape:
                if value.dim() == 0 or value.shape[0] != layer.num_groups:
                    raise ValueError(
                        f"thin_posterior: site {before.site!r} of {layer.prior!r} has shape "
                        f"{tuple(value.shape)}: neither one value per group of layer "
                        f"{layer.site()!r} ({layer.num_groups}) nor the same for any number of "
                        "groups"
                    )
                value = value[groups.to(value.device)]
            getattr(after, name).copy_(value)
    rows, cols = plan.out_keep.to(old.weight.loc.device), plan.in_keep.to(old.weight.loc.device)
    for name in ("loc", "log_var"):
        getattr(new.weight, name).copy_(getattr(old.weight, name)[rows][:, cols])
        if old.bias is not None:
            getattr(new.bias, name).copy_(getattr(old.bias, name)[rows])


def _fold_pruned_inputs(old_layer, new_layer, plan, old, new, summary, mean):
    """Adds the mean effect of the pruned inputs to the kept units' bias, as compression does."""
    rows, dropped = plan.out_keep, ~plan.in_keep
    if not dropped.any():
        return
    if old_layer.kind == "dense":
        # the bias is not scaled: E[w] of the dropped columns times their mean input
        effect = summary.weight_mean.cpu()[rows][:, dropped] @ mean[dropped]
    else:
        # (conv(x, theta) + b) z: the dropped channels' mean times the sum of theta's taps
        taps = old.weight.loc.double().cpu()[rows][:, dropped].flatten(2).sum(-1)
        effect = taps @ mean[dropped]
    if new.bias is not None:
        new.bias.loc.add_(effect.to(new.bias.loc))
    elif getattr(new_layer, "batch_norm", None) is not None:
        # batch norm subtracts its running mean: a constant input shift moves it
        new_layer.batch_norm.running_mean.sub_(effect.to(new_layer.batch_norm.running_mean))
