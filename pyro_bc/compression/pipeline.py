"""``compress(guide)``: posterior summaries -> thresholds -> masks -> thinned, quantized network.

Compression is a pure function of the guide (plus thresholds, and the data the caller passes for
calibration and validation): the same guide gives the same network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..batches import require_reiterable
from ..checks import is_number
from ..compressed import CompressedNetwork
from ..infer import evaluate
from ..nn import BayesianLayer
from ..predictive import network_metrics, predictive_metrics
from .bits import by_rule, exponent_bits, resolve_bits
from .budget import keeps_of, ranked, search_bits, search_thresholds, widened
from .calibration import input_means
from .chain import trace_chain
from .masks import LayerMasks, plan_masks
from .report import CompressionReport, LayerReport
from .summaries import summarise
from .thinning import kept_parameters, thin
from .thresholds import resolve_thresholds


@dataclass
class Analysis:
    """Everything compression reads off a guide before it builds anything.

    Example::

        analysis = analyse(guide, thresholds="auto")
        analysis.plans["fc1"].in_keep.sum()
    """

    model: torch.nn.Module
    chain: list
    shape: tuple
    summaries: dict
    thresholds: dict  # site -> (threshold, rule)
    plans: dict

    @property
    def layers(self) -> list:
        return [link for link in self.chain if isinstance(link.module, BayesianLayer)]


def _check_guide(guide):
    model = getattr(guide, "model", None)
    if model is None or not callable(getattr(guide, "distributions", None)):
        raise ValueError(
            f"compress needs a pyro_bc.StructuredGuide (with .model and .distributions()); "
            f"got {type(guide).__name__}"
        )


@torch.no_grad()
def analyse(guide, thresholds=None, input_shape=None) -> Analysis:
    """The proved chain, the posterior summaries, the thresholds and the masks of ``guide``.

    Example::

        analysis = analyse(guide, thresholds={"fc1": -2.8, "fc2": -3, "fc3": -5})
    """
    _check_guide(guide)
    chain = trace_chain(guide, input_shape)
    layers = [link.module for link in chain if isinstance(link.module, BayesianLayer)]
    posteriors = guide.distributions()
    summaries = {layer.site(): summarise(layer, posteriors) for layer in layers}
    chosen = resolve_thresholds(
        thresholds,
        {site: s.log_alpha for site, s in summaries.items()},
        {layer.site(): layer.prior.mode_separation for layer in layers},
    )
    keeps = {site: summaries[site].log_alpha < chosen[site][0] for site in summaries}
    plans = plan_masks(chain, keeps)
    return Analysis(guide.model, chain, chain[0].input_shape, summaries, chosen, plans)


@torch.no_grad()
def group_masks(guide, thresholds=None, *, input_shape=None) -> dict:
    """The masks :func:`compress` would apply, per Bayesian layer: ``{name: LayerMasks}``.

    Same arguments and same computation as :func:`compress` (``thresholds`` as there), without
    building the network: for plots and for inspecting a posterior before compressing it.

    Example::

        masks = group_masks(guide, thresholds="auto")
        {name: int(m.groups_kept.sum()) for name, m in masks.items()}  # {'fc1': 278, ...}
    """
    analysis = analyse(guide, thresholds, input_shape)
    return _masks(analysis)


def _masks(analysis):
    masks = {}
    for link in analysis.layers:
        layer = link.module
        site = layer.site()
        summary, plan = analysis.summaries[site], analysis.plans[site]
        threshold, rule = analysis.thresholds[site]
        masks[site] = LayerMasks(
            name=site,
            kind=layer.kind,
            log_alpha=summary.log_alpha.clone(),
            threshold=threshold,
            threshold_rule=rule,
            below_threshold=summary.log_alpha < threshold,
            in_keep=plan.in_keep.clone(),
            out_keep=plan.out_keep.clone(),
            weight_mean=summary.weight_mean.clone(),
            weight_var=summary.weight_var.clone(),
            mode_separation=layer.prior.mode_separation,
        )
    return masks


@torch.no_grad()
def compress(
    guide,
    thresholds=None,
    *,
    bits="auto",
    input_shape=None,
    test_loader=None,
    calibration=None,
    validation=None,
    max_error_increase=None,
    reference_error=None,
    predictive_samples=10,
) -> CompressedNetwork:
    """Compresses the posterior of ``guide`` into a thinned, quantized :class:`CompressedNetwork`.

    :param guide: a trained :class:`~pyro_bc.StructuredGuide`. Its model's forward pass must be a
        chain of Bayesian layers and ReLU / LeakyReLU / Tanh / MaxPool2d / AvgPool2d / Flatten /
        Identity / Dropout modules, each called once on the previous one's output; this is
        proved from a traced forward pass (:func:`~pyro_bc.compression.chain.trace_chain`), and
        anything else is refused with the module's name.
    :param thresholds: groups whose pruning quantity (the prior's ``log_dropout_rate``) is at or
        above their layer's threshold are pruned. A number for every layer, a dict ``{layer:
        number or "auto"}`` (missing layers: ``"auto"``), or ``"auto"`` (the default, also None):
        the valley between the two modes of each layer's histogram
        (:func:`~pyro_bc.compression.thresholds.histogram_valley`), and -3 where there are no
        two modes the prior's ``mode_separation`` apart. With ``validation``, these are ignored
        and the thresholds are searched for the error budget.
    :param bits: ``"auto"``: the paper's bit-width rule per layer
        (:func:`~pyro_bc.compression.bits.significand_bits`); an int ``t`` in 0..23: that many
        fraction bits for every layer; a dict ``{layer: int or "auto"}``; or None: no
        quantization, float32 posterior means.
    :param input_shape: the shape of one example; default ``guide.model.input_shape``.
    :param test_loader: optional ``(x, y)`` batches; the report then states the test error of
        the returned network and of the dense posterior-mean network. It is only reported:
        nothing is chosen on it.
    :param calibration: optional ``(x, y)`` batches of *training* data: a pruned input is then
        replaced by its mean instead of by zero (:mod:`pyro_bc.compression.calibration`).
    :param validation: optional ``(x, y)`` batches of held-out *training* data (never the test
        set), with ``max_error_increase``: the thresholds are then searched for the smallest
        network whose validation error stays within ``max_error_increase`` (a fraction, e.g.
        ``0.001`` for 0.1 points) of the dense posterior-mean network's, and the bit widths of
        ``bits="auto"`` are lowered while it stays there (:mod:`pyro_bc.compression.budget`).
        The chosen network's validation error is an optimistic estimate: expect a larger
        increase on new data (``docs/method.md#thresholds``).
    :param reference_error: the validation error the budget is counted from, instead of this
        guide's dense posterior-mean network's: for a retrained thinned posterior
        (:func:`~pyro_bc.compression.thinned_posterior.thin_posterior`), the error of the dense
        network it was thinned from.
    :param predictive_samples: with ``test_loader``, the report also gives the negative
        log-likelihood and expected calibration error of the compressed network (a point
        estimate) and of the dense posterior predictive averaged over this many draws of the
        weights (:mod:`pyro_bc.predictive`); 0 skips them.
    :raises ValueError: for a model compress cannot thin (it names the module and lists what is
        supported), thresholds that remove a whole layer, or bad arguments.

    Example::

        compressed = pyro_bc.compress(guide, thresholds="auto", test_loader=test_loader)
        print(compressed.report)   # architecture 784-300-100 -> 278-98-13, rates, bits, error
        compressed.save("lenet300.bc")
        smallest = pyro_bc.compress(guide, validation=val_loader, max_error_increase=0.001)
    """
    if (validation is None) != (max_error_increase is None):
        raise ValueError(
            "compress: validation and max_error_increase go together: pass both to search "
            "for the smallest network within the error budget, or neither"
        )
    if max_error_increase is not None and not (
        isinstance(max_error_increase, (int, float)) and 0 <= max_error_increase < 1
    ):
        raise ValueError(
            f"compress: max_error_increase is a fraction in [0, 1) (0.001 = 0.1 points of "
            f"error), got {max_error_increase!r}"
        )
    if reference_error is not None and validation is None:
        raise ValueError("compress: reference_error needs validation and max_error_increase")
    if reference_error is not None and not (
        is_number(reference_error) and 0 <= reference_error <= 1
    ):
        raise ValueError(
            f"compress: reference_error is an error rate in [0, 1] (the validation error the "
            f"budget is counted from), got {reference_error!r}"
        )
    if validation is not None:
        require_reiterable(validation, "compress(validation=...)")
    if test_loader is not None:
        require_reiterable(test_loader, "compress(test_loader=...)")
    # with a budget the search replaces the thresholds: start from the whole network
    analysis = analyse(guide, math.inf if validation is not None else thresholds, input_shape)
    means, calibration_examples = {}, None
    if calibration is not None:
        means, calibration_examples = input_means(analysis.chain, analysis.summaries, calibration)

    budget = None
    if validation is not None:
        dense = evaluate(analysis.model, guide, validation)
        base = dense["error"] if reference_error is None else reference_error
        allowed = base + max_error_increase
        pruned, analysis.thresholds, extra_bits = search_thresholds(
            analysis, means, validation, base, max_error_increase, bits
        )
        keeps = keeps_of(ranked(analysis.summaries), pruned)
        analysis.plans = plan_masks(analysis.chain, keeps)
        budget = (dense, allowed, pruned)

    kept = {
        site: kept_parameters(analysis.summaries[site], plan, means.get(site))
        for site, plan in analysis.plans.items()
    }
    frac_bits = resolve_bits(bits, {site: k[1] for site, k in kept.items()})
    bit_rules = {
        site: "float32" if t is None else ("variance" if by_rule(bits, site) else "given")
        for site, t in frac_bits.items()
    }
    if budget is not None:
        rule = frac_bits
        frac_bits = widened(bits, frac_bits, extra_bits)
        if bits == "auto":
            frac_bits = search_bits(analysis, means, validation, budget[1], budget[2], frac_bits)
        bit_rules.update({site: "budget" for site, t in frac_bits.items() if t != rule[site]})

    network, widths = thin(analysis.chain, analysis.plans, kept, frac_bits, analysis.shape)
    quantized = [kept[site][0] for site, t in frac_bits.items() if t is not None]
    e = exponent_bits(max(w.abs().max().item() for w in quantized)) if quantized else None
    layers = [
        _layer_report(link, analysis, kept[link.module.site()], frac_bits, bit_rules, e, widths)
        for link in analysis.layers
    ]
    _, layout = network.encode()
    report = CompressionReport(
        layers=layers,
        exponent_bits=e,
        input_shape=analysis.shape,
        file_bytes=sum(layout.values()),
        file_layout=layout,
        calibration_examples=calibration_examples,
    )
    if budget is not None:
        report.dense_validation_error = budget[0]["error"]
        report.validation_examples = budget[0]["n"]
        report.validation_error = network.evaluate(validation)["error"]
        report.max_error_increase = max_error_increase
        report.reference_validation_error = reference_error
    if test_loader is not None:
        result = network.evaluate(test_loader)
        report.test_error, report.test_examples = result["error"], result["n"]
        report.dense_test_error = evaluate(analysis.model, guide, test_loader)["error"]
        if predictive_samples:
            compressed = network_metrics(network, test_loader)
            dense_predictive = predictive_metrics(
                analysis.model, guide, test_loader, num_samples=predictive_samples
            )
            report.test_nll, report.test_ece = compressed.nll, compressed.ece
            report.dense_test_nll, report.dense_test_ece = (
                dense_predictive.nll,
                dense_predictive.ece,
            )
            report.predictive_samples = predictive_samples
    network.report = report
    return network


def _layer_report(link, analysis, kept, frac_bits, bit_rules, e, widths):
    layer = link.module
    site = layer.site()
    plan = analysis.plans[site]
    weight, _, bias = kept
    t = frac_bits[site]
    weights_kept = weight.numel()
    # a convolution's weights are used once per output position
    spatial = math.prod(link.output_shape[1:]) if layer.kind == "conv" else 1
    # a thinned posterior's layer is counted against the layer it was thinned from
    full = layer.full_weight_shape
    total = math.prod(full)
    return LayerReport(
        name=site,
        kind=layer.kind,
        groups=full[layer.group_dim],
        groups_below_threshold=plan.below_threshold,
        groups_kept=int((plan.in_keep if layer.group_dim == 1 else plan.out_keep).sum()),
        threshold=analysis.thresholds[site][0],
        threshold_rule=analysis.thresholds[site][1],
        weights=total,
        weights_kept=weights_kept,
        biases=0 if bias is None else full[0],
        biases_kept=0 if bias is None else bias.numel(),
        kept_shape=tuple(weight.shape),
        frac_bits=t,
        bits_rule=bit_rules[site],
        paper_bits=32 if t is None else 1 + e + t,
        file_bits=widths[site],
        macs=total * spatial,
        macs_kept=weights_kept * spatial,
    )
