"""Group masks and their propagation along the chain.

A layer keeps the groups below its threshold. Masks then propagate: a pruned input of a dense
layer removes the matching output of the Bayesian layer before it (a row and bias of a dense
layer; a filter of a convolution once *all* of its flattened inputs are pruned); a pruned filter
removes that input channel of the next convolution and its ``H x W`` block of the next dense
layer's inputs. Inputs a dense layer no longer reads are dropped by a
:class:`~pyro_bc.gather.Gather` in front of it (the pruned pixels in front of LeNet-300-100's
fc1). Only modules with ``f(0) = 0`` that act per channel sit between Bayesian layers
(:mod:`pyro_bc.compression.chain`), so a removed unit contributes exactly what the posterior-mean
network with that group's scale set to zero would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..gather import Gather
from ..nn import BayesianLayer


@dataclass
class LayerPlan:
    """What one Bayesian layer keeps: inputs, outputs, and the Gather in front of it if any.

    ``gather`` holds the positions of the kept inputs among the ``gather_from`` features the
    thinned network still delivers (None when the layer reads all of them).

    Example::

        plan = plan_masks(chain, keeps)["fc1"]
        int(plan.in_keep.sum()), plan.gather is not None  # (278, True)
    """

    in_keep: torch.Tensor
    out_keep: torch.Tensor
    below_threshold: int
    gather: torch.Tensor | None = None
    gather_from: int = 0


@dataclass
class _Edge:
    site: str
    layer: BayesianLayer
    before: str | None  # the Bayesian layer feeding this one
    owner: torch.Tensor | None  # per input feature of this layer, the unit of `before` behind it
    # a Gather in front of a dense layer (a thinned posterior's): the positions it keeps among
    # the flat features reaching it, and the owners of those features
    selection: torch.Tensor | None = None
    reaching: torch.Tensor | None = None
    reaching_size: int = 0


def _edges(chain):
    edges, before, owner, gather = [], None, None, {}
    for link in chain:
        module = link.module
        if isinstance(module, BayesianLayer):
            edges.append(_Edge(module.site(), module, before, owner, **gather))
            before, owner, gather = module.site(), torch.arange(module.weight_shape[0]), {}
        elif isinstance(module, nn.Flatten) and owner is not None and len(link.input_shape) > 1:
            owner = owner.repeat_interleave(math.prod(link.input_shape[1:]))
        elif isinstance(module, Gather):
            selection = module.index.cpu()
            gather = dict(selection=selection, reaching=owner, reaching_size=module.in_features)
            owner = None if owner is None else owner[selection]
    return edges


def plan_masks(chain, keeps: dict) -> dict:
    """``{site: LayerPlan}`` from each layer's own kept groups ``keeps`` (site -> bool mask),
    propagated along ``chain`` (see the module docstring).

    Example::

        plans = plan_masks(trace_chain(guide), {"fc1": keep1, "fc2": keep2, "fc3": keep3})
    """
    edges = _edges(chain)
    out_keep = {
        e.site: keeps[e.site].clone()
        if e.layer.kind == "conv"
        else torch.ones(e.layer.weight_shape[0], dtype=torch.bool)
        for e in edges
    }
    in_keep = {}
    for e in edges:
        upstream = None if e.before is None else out_keep[e.before][e.owner]
        if e.layer.kind == "conv":
            in_keep[e.site] = (
                torch.ones(e.layer.weight_shape[1], dtype=torch.bool)
                if upstream is None
                else upstream.clone()
            )
            continue
        in_keep[e.site] = keeps[e.site] & (True if upstream is None else upstream)
        if e.before is not None:
            # a unit of the layer before that no kept input of this layer reads can go
            used = torch.zeros_like(out_keep[e.before])
            used[e.owner[in_keep[e.site]]] = True
            out_keep[e.before] &= used
    plans = {}
    for e in edges:
        plan = LayerPlan(in_keep[e.site], out_keep[e.site], int(keeps[e.site].sum()))
        if e.layer.kind == "dense":
            _plan_gather(plan, e, None if e.before is None else out_keep[e.before])
        plans[e.site] = plan
    for site, plan in plans.items():
        if not plan.in_keep.any():
            raise ValueError(
                f"compress: the thresholds remove every input of layer {site!r} (its own groups "
                "or the units of the layer before it), so the network would ignore its input; "
                "use a higher threshold for it or the layer before it"
            )
    for site, plan in plans.items():
        if not plan.out_keep.any():
            raise ValueError(
                f"compress: no output of layer {site!r} is used by the next layer, whose inputs "
                "are all pruned; use a higher threshold for the next layer"
            )
    return plans


def _plan_gather(plan, edge, upstream_kept):
    """The Gather in front of a dense layer: the positions of its kept inputs, in its own input
    order, among the features the thinned network delivers. A Gather already in the chain (a
    thinned posterior's) is folded in, so thinning leaves that one out."""
    if edge.selection is None:
        positions, owner, size = plan.in_keep.nonzero().flatten(), edge.owner, len(plan.in_keep)
    else:
        positions, owner, size = edge.selection[plan.in_keep], edge.reaching, edge.reaching_size
    available = (
        torch.ones(size, dtype=torch.bool) if upstream_kept is None else upstream_kept[owner]
    )
    if edge.selection is None and torch.equal(plan.in_keep, available):
        return
    plan.gather = (available.long().cumsum(0) - 1)[positions]
    plan.gather_from = int(available.sum())


@dataclass
class LayerMasks:
    """What :func:`pyro_bc.compress` keeps of one Bayesian layer, and the summaries behind it.

    Masks are boolean, ``True`` = kept, after propagation through the chain (a unit no later
    layer reads is removed even if its own group is kept). ``weight_mean`` and ``weight_var``
    are ``E[w]`` and ``Var[w]`` of the whole (unpruned) weight tensor, float64, shaped like the
    layer's weights: ``(out, in)`` for dense layers, ``(out, in, kh, kw)`` for convolutions.

    :ivar name: the layer's site prefix, e.g. ``"fc1"``.
    :ivar kind: ``"dense"`` (groups are the inputs) or ``"conv"`` (groups are the filters).
    :ivar log_alpha: the pruning quantity of every group (``prior.log_dropout_rate``).
    :ivar threshold: the threshold applied; a group is pruned when ``log_alpha >= threshold``.
    :ivar threshold_rule: ``"given"``, ``"auto"``, ``"auto: one mode, default"`` or
        ``"budget"``.
    :ivar below_threshold: ``log_alpha < threshold``: the groups the layer's own posterior keeps.
    :ivar in_keep: the kept inputs (dense: input features; conv: input channels).
    :ivar out_keep: the kept outputs (dense: output units; conv: filters).
    :ivar mode_separation: the prior's :attr:`~pyro_bc.priors.GroupPrior.mode_separation`, which
        ``"auto"`` thresholds use.

    Example::

        fc1 = group_masks(guide)["fc1"]
        fc1.groups_kept.sum(), fc1.out_keep.sum()  # e.g. (tensor(278), tensor(300))
    """

    name: str
    kind: str
    log_alpha: torch.Tensor
    threshold: float
    threshold_rule: str
    below_threshold: torch.Tensor
    in_keep: torch.Tensor
    out_keep: torch.Tensor
    weight_mean: torch.Tensor
    weight_var: torch.Tensor
    mode_separation: float = 4.0

    @property
    def groups_kept(self) -> torch.Tensor:
        """The kept groups: ``in_keep`` for dense layers, ``out_keep`` for convolutions."""
        return self.in_keep if self.kind == "dense" else self.out_keep

    @property
    def weight_kept(self) -> torch.Tensor:
        """A boolean mask shaped like the weights: the weights the thinned layer holds."""
        kept = self.out_keep[:, None] & self.in_keep[None, :]
        return kept.reshape(kept.shape + (1,) * (self.weight_mean.dim() - 2)).expand(
            self.weight_mean.shape
        )
