"""Thresholds and bit widths chosen for an error budget on validation data.

Given a validation loader (held-out *training* data, never the test set) and a budget
``max_error_increase``, the search looks for the smallest network whose validation error stays
within ``dense + max_error_increase``, ``dense`` being the validation error of the dense
posterior-mean network:

1. **Thresholds.** Each layer's groups are ranked by their pruning quantity; pruning the ``k``
   highest is one threshold. Layers are visited in the order of the weights one more pruned
   group removes (a group of fc2 also removes a row of fc1), and for each a bisection finds the
   largest ``k`` whose network, quantized as ``bits`` says, stays within the budget, the other
   layers fixed. Two passes: the first may spend half of the budget, the second all of it, so
   that the first layer visited does not take it all.
2. **Bits.** From the paper's bit-width rule, each layer's fraction bits are lowered (largest
   layer first, bisection) while the quantized network stays within the budget.

The error is assumed to grow with ``k`` and to fall with the bits (bisection needs it); the final
network is checked against the whole budget. See ``docs/method.md#thresholds``.
"""

from __future__ import annotations

import math

import torch

from ..fixed_point import MAX_FRACTION_BITS
from .bits import by_rule, resolve_bits
from .masks import plan_masks
from .thinning import kept_parameters, thin

PASSES = (0.5, 1.0)
#: the most fraction bits added to the paper's widths when they alone break the budget
MAX_EXTRA_BITS = 8


def ranked(summaries) -> dict:
    """Each layer's groups, most prunable first (highest pruning quantity).

    Example::

        ranked(analysis.summaries)["fc1"][:3]  # the three inputs of fc1 pruned first
    """
    return {
        site: torch.argsort(s.log_alpha, descending=True, stable=True)
        for site, s in summaries.items()
    }


def keeps_of(order: dict, pruned: dict) -> dict:
    """The masks that prune the first ``pruned[site]`` groups of each layer's ``order``.

    Example::

        keeps = keeps_of(ranked(analysis.summaries), {"fc1": 500, "fc2": 200, "fc3": 80})
    """
    keeps = {}
    for site, groups in order.items():
        keep = torch.ones(groups.numel(), dtype=torch.bool)
        keep[groups[: pruned[site]]] = False
        keeps[site] = keep
    return keeps


class _Search:
    def __init__(self, analysis, means, validation, bits=None):
        self.analysis = analysis
        self.bits = bits  # compress's bits argument, resolved for every candidate
        self.extra_bits = 0  # added to the widths of the paper's rule (see widened)
        self.means = means
        self.validation = validation
        self.order = ranked(analysis.summaries)

    def plans(self, pruned):
        try:
            return plan_masks(self.analysis.chain, keeps_of(self.order, pruned))
        except ValueError:  # a layer left without inputs or outputs
            return None

    def weights_kept(self, pruned):
        plans = self.plans(pruned)
        if plans is None:
            return None
        return sum(
            int(p.out_keep.sum())
            * int(p.in_keep.sum())
            * math.prod(self.analysis.summaries[site].weight_mean.shape[2:])
            for site, p in plans.items()
        )

    def error(self, pruned: dict, bits: dict | None = None):
        """Validation error of the network with ``pruned[site]`` groups pruned per layer (with
        ``bits``, or compress's bit rule for its kept weights), or None when those masks leave
        a layer without inputs or outputs."""
        plans = self.plans(pruned)
        if plans is None:
            return None
        kept = {
            site: kept_parameters(self.analysis.summaries[site], plan, self.means.get(site))
            for site, plan in plans.items()
        }
        if bits is None:
            bits = widened(
                self.bits,
                resolve_bits(self.bits, {site: k[1] for site, k in kept.items()}),
                self.extra_bits,
            )
        try:
            network, _ = thin(self.analysis.chain, plans, kept, bits, self.analysis.shape)
        except ValueError:
            return None
        return network.evaluate(self.validation)["error"]

    def within(self, pruned, limit, bits=None):
        error = self.error(pruned, bits)
        return error is not None and error <= limit


def search_thresholds(analysis, means, validation, dense_error, max_error_increase, bits="auto"):
    """``{site: k}``, the number of groups pruned per layer, the thresholds they amount to
    (``{site: (threshold, "budget")}``) and the fraction bits added to the paper's widths
    because they alone broke the budget (0 mostly; :func:`widened`). ``bits`` is compress's
    argument.

    Example::

        pruned, thresholds, extra = search_thresholds(analysis, {}, val_loader, 0.0158, 0.001)
    """
    search = _Search(analysis, means, validation, bits)
    pruned = dict.fromkeys(analysis.summaries, 0)
    # where the paper's widths alone break the budget, every candidate gets wider ones
    while search.extra_bits < MAX_EXTRA_BITS and not search.within(
        pruned, dense_error + max_error_increase
    ):
        search.extra_bits += 1
    everything = search.weights_kept(pruned)
    # the weights one more pruned group of each layer removes from the whole network
    gain = {
        site: everything - (search.weights_kept({**pruned, site: 1}) or everything)
        for site in pruned
    }
    visit = sorted(pruned, key=gain.get, reverse=True)
    for fraction in PASSES:
        limit = dense_error + fraction * max_error_increase
        for site in visit:
            low, high = pruned[site], search.order[site].numel() - 1
            while low < high:  # the largest feasible k in [low, high]; low is feasible
                mid = (low + high + 1) // 2
                if search.within({**pruned, site: mid}, limit):
                    low = mid
                else:
                    high = mid - 1
            pruned[site] = low
    thresholds = {}
    for site, k in pruned.items():
        values = analysis.summaries[site].log_alpha[search.order[site]].double()
        thresholds[site] = (_between(values, k), "budget")
    return pruned, thresholds, search.extra_bits


def widened(bits, frac_bits: dict, extra: int) -> dict:
    """``frac_bits`` with ``extra`` more fraction bits on the layers whose width is the paper's
    rule (``bits`` ``"auto"`` for them), at most :data:`~pyro_bc.fixed_point` allows.

    Example::

        widened("auto", {"fc1": 3, "fc2": 5}, 2)  # {'fc1': 5, 'fc2': 7}
    """
    if not extra:
        return frac_bits
    return {
        site: t if t is None or not by_rule(bits, site) else min(t + extra, MAX_FRACTION_BITS)
        for site, t in frac_bits.items()
    }


def _between(sorted_desc, k):
    """A threshold that prunes exactly the first ``k`` of the descending ``sorted_desc``."""
    if k == 0:
        return math.inf
    last_pruned = sorted_desc[k - 1].item()
    if k == sorted_desc.numel():
        return last_pruned
    first_kept = sorted_desc[k].item()
    if not math.isfinite(last_pruned):  # a group whose scale has mean zero
        return first_kept + 1.0 if math.isfinite(first_kept) else last_pruned
    return (last_pruned + first_kept) / 2 if last_pruned > first_kept else last_pruned


def search_bits(analysis, means, validation, allowed_error, pruned, frac_bits):
    """Lowers each layer's fraction bits (largest layer first) while the quantized network's
    validation error stays within ``allowed_error``; returns the new ``{site: t}``.

    Example::

        bits = search_bits(analysis, means, val_loader, 0.017, pruned, {"fc1": 6})
    """
    search = _Search(analysis, means, validation)
    bits = dict(frac_bits)
    sizes = {site: s.weight_mean.numel() for site, s in analysis.summaries.items()}
    for site in sorted(sizes, key=sizes.get, reverse=True):
        if bits[site] is None:
            continue
        if not search.within(pruned, allowed_error, bits):
            break  # the paper's widths already exceed the budget: keep them
        low, high = 0, bits[site]  # the fewest feasible bits in [low, high]; high is feasible
        while low < high:
            mid = (low + high) // 2
            if search.within(pruned, allowed_error, {**bits, site: mid}):
                high = mid
            else:
                low = mid + 1
        bits[site] = high
    return bits
