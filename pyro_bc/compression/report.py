"""The compression report: per layer and in total, the paper's accounting and the real file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


@dataclass
class LayerReport:
    """What compression did to one Bayesian layer (see :class:`CompressionReport`).

    ``groups_below_threshold`` counts the layer's own groups under its threshold;
    ``groups_kept`` the groups left after masks propagated through the chain. ``paper_bits`` is
    ``1 + e + t`` (the paper's accounting, ``docs/method.md#compression-rates``), ``file_bits`` the
    width the file really stores.

    Example::

        fc1 = compressed.report.layers[0]
        fc1.groups_kept, fc1.frac_bits, fc1.file_bits  # (278, 5, 7)
    """

    name: str
    kind: str  # "dense" (groups: inputs) or "conv" (groups: filters)
    groups: int
    groups_below_threshold: int
    groups_kept: int
    threshold: float
    threshold_rule: str  # "given", "auto", "auto: one mode, default" or "budget"
    weights: int
    weights_kept: int
    biases: int
    biases_kept: int
    kept_shape: tuple
    frac_bits: int | None  # t_l; None when kept in float32
    bits_rule: str  # "variance" (the paper's rule), "given", "float32" or "budget"
    paper_bits: int  # 1 + e + t_l per weight (32 in float32)
    file_bits: int  # the width stored in the file (32 in float32)
    macs: int
    macs_kept: int


@dataclass
class CompressionReport:
    """Per-layer and total numbers of a compression: ``print(report)``, ``report.to_dict()``.

    Rates follow the paper's accounting (``docs/method.md#compression-rates``):
    ``pruning_rate = |W| / |W kept|`` and
    ``precision_rate = 32 |W| / sum_l |W_l kept| (1 + e + t_l)``, biases not counted. The real
    file is compared with the dense float32 network *including* biases (``file_rate``); the
    difference between the two is ``file_layout`` (header, biases, gather masks, weight bits).

    Example::

        report = pyro_bc.compress(guide).report
        print(report)
        report.to_dict()["precision_rate"]
    """

    layers: list
    exponent_bits: int | None
    input_shape: tuple
    file_bytes: int
    file_layout: dict
    test_error: float | None = None
    test_examples: int | None = None
    dense_test_error: float | None = None
    calibration_examples: int | None = None
    test_nll: float | None = None
    test_ece: float | None = None
    dense_test_nll: float | None = None
    dense_test_ece: float | None = None
    predictive_samples: int | None = None
    validation_error: float | None = None
    dense_validation_error: float | None = None
    validation_examples: int | None = None
    max_error_increase: float | None = None
    reference_validation_error: float | None = None
    retraining: dict | None = None
    refit: dict | None = None

    @property
    def architecture(self) -> str:
        """Groups per Bayesian layer, before and after: ``"784-300-100 -> 278-98-13"``."""
        before = "-".join(str(layer.groups) for layer in self.layers)
        after = "-".join(str(layer.groups_kept) for layer in self.layers)
        return f"{before} -> {after}"

    @property
    def weights(self) -> int:
        """|W|: the weights of all Bayesian layers before compression (biases not counted)."""
        return sum(layer.weights for layer in self.layers)

    @property
    def weights_kept(self) -> int:
        """The weights of the thinned layers."""
        return sum(layer.weights_kept for layer in self.layers)

    @property
    def pruning_rate(self) -> float:
        """the paper's "after pruning" rate ``|W| / |W kept|``."""
        return self.weights / self.weights_kept

    @property
    def paper_bits_total(self) -> int:
        """``sum_l |W_l kept| (1 + e + t_l)``: the kept weights' size in the paper's accounting."""
        return sum(layer.weights_kept * layer.paper_bits for layer in self.layers)

    @property
    def precision_rate(self) -> float:
        """the paper's "after precision" rate ``32 |W| / sum_l |W_l kept| (1 + e + t_l)``."""
        return 32 * self.weights / self.paper_bits_total

    @property
    def original_bytes(self) -> int:
        """The dense float32 network's weights and biases, in bytes."""
        return 4 * sum(layer.weights + layer.biases for layer in self.layers)

    @property
    def file_rate(self) -> float:
        """The dense float32 network with biases over the real file's size."""
        return self.original_bytes / self.file_bytes

    @property
    def macs(self) -> int:
        """Multiply-adds per example of the Bayesian layers before compression."""
        return sum(layer.macs for layer in self.layers)

    @property
    def macs_kept(self) -> int:
        """Multiply-adds per example of the thinned layers."""
        return sum(layer.macs_kept for layer in self.layers)

    def to_dict(self) -> dict:
        """Everything in the report as JSON-ready data (per layer and totals).

        A layer whose threshold keeps every group (``inf``) has ``"threshold": None`` (JSON
        ``null``): strict JSON has no infinity.

        Example::

            compressed.report.to_dict()["layers"][0]["groups_kept"]  # e.g. 278
        """
        return {
            "layers": [_layer_dict(layer) for layer in self.layers],
            "architecture": self.architecture,
            "input_shape": list(self.input_shape),
            "weights": self.weights,
            "weights_kept": self.weights_kept,
            "pruning_rate": self.pruning_rate,
            "exponent_bits": self.exponent_bits,
            "paper_bits_total": self.paper_bits_total,
            "precision_rate": self.precision_rate,
            "original_bytes": self.original_bytes,
            "file_bytes": self.file_bytes,
            "file_layout": dict(self.file_layout),
            "file_rate": self.file_rate,
            "macs": self.macs,
            "macs_kept": self.macs_kept,
            "test_error": self.test_error,
            "test_examples": self.test_examples,
            "dense_test_error": self.dense_test_error,
            "calibration_examples": self.calibration_examples,
            "test_nll": self.test_nll,
            "test_ece": self.test_ece,
            "dense_test_nll": self.dense_test_nll,
            "dense_test_ece": self.dense_test_ece,
            "predictive_samples": self.predictive_samples,
            "validation_error": self.validation_error,
            "dense_validation_error": self.dense_validation_error,
            "validation_examples": self.validation_examples,
            "max_error_increase": self.max_error_increase,
            "reference_validation_error": self.reference_validation_error,
            "retraining": self.retraining,
            "refit": self.refit,
        }

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as a JSON string (``kwargs`` go to ``json.dumps``).

        Example::

            Path("report.json").write_text(compressed.report.to_json(indent=2))
        """
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return "\n".join(_format_report(self))


def _layer_dict(layer: LayerReport) -> dict:
    record = asdict(layer)
    if not math.isfinite(layer.threshold):
        record["threshold"] = None
    return record


def _format_report(r):
    rows = [("layer", "groups kept", "threshold", "weights kept", "t", "bits paper/file", "MACs")]
    for layer in r.layers:
        rows.append(
            (
                f"{layer.name} ({layer.kind})",
                f"{layer.groups_kept}/{layer.groups}",
                f"{layer.threshold:.3g} ({layer.threshold_rule})",
                f"{layer.weights_kept:,}/{layer.weights:,}",
                "-" if layer.frac_bits is None else f"{layer.frac_bits} ({layer.bits_rule})",
                f"{layer.paper_bits}/{layer.file_bits}",
                f"{layer.macs:,} -> {layer.macs_kept:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["pyro_bc compression report"]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    layout = r.file_layout
    paper_bytes = r.paper_bits_total / 8
    lines += [
        f"architecture     {r.architecture} (groups kept per Bayesian layer)",
        f"after pruning    {r.weights:,} -> {r.weights_kept:,} weights: x{r.pruning_rate:.2f}",
        f"after precision  x{r.precision_rate:.2f} (32 |W| / sum |W_l| (1 + e + t_l), "
        f"e = {r.exponent_bits}, biases not counted: {paper_bytes:,.0f} B)",
        f"file             {r.file_bytes:,} B vs {r.original_bytes:,} B dense float32 with "
        f"biases: x{r.file_rate:.2f}",
        f"  file layout    header {layout['header']:,} B, weights {layout['weights']:,} B, "
        f"biases {layout['biases']:,} B, gather masks {layout['masks']:,} B "
        f"({r.file_bytes - paper_bytes:+,.0f} B against the accounting)",
        f"multiply-adds    {r.macs:,} -> {r.macs_kept:,} per example (x{r.macs / r.macs_kept:.2f})",
    ]
    if r.calibration_examples:
        lines.append(
            f"biases           hold the mean contribution of the pruned inputs "
            f"({r.calibration_examples:,} calibration examples)"
        )
    if r.retraining:
        t = r.retraining
        lines.append(
            f"retraining       {t['epochs']} epochs of SVI (lr {t['lr']:g}) on the posterior "
            f"thinned to {t['thinned_architecture']} (validation budget "
            f"+{t['prune_error_increase']:.2%}), then compressed again"
            + (f" (round {t['round']} of {t['rounds']})" if t.get("rounds", 1) > 1 else "")
        )
    if r.refit:
        f = r.refit
        lines.append(
            f"refit            {f['epochs']} epochs of SVI (lr {f['lr']:g}) on all "
            f"{f['examples']:,} training examples, validation included, with these groups and "
            "bit widths"
            + (
                ""
                if f["chosen_validation_error"] is None
                else f" (chosen at validation error {f['chosen_validation_error']:.2%})"
            )
        )
    if r.validation_error is not None:
        reference = ""
        if r.reference_validation_error is not None:
            reference = f" over the reference {r.reference_validation_error:.2%}"
        lines.append(
            f"validation error {r.validation_error:.2%} on {r.validation_examples:,} examples "
            f"(dense posterior-mean network {r.dense_validation_error:.2%}; budget "
            f"+{r.max_error_increase:.2%}{reference})"
        )
    if r.test_error is not None:
        dense = ""
        if r.dense_test_error is not None:
            dense = f"; dense posterior-mean network {r.dense_test_error:.2%}"
        lines.append(
            f"test error       {r.test_error:.2%} on {r.test_examples:,} examples "
            f"(this compressed network{dense})"
        )
    if r.dense_test_nll is not None:
        lines.append(
            f"calibration      NLL {r.test_nll:.4f} nats, ECE {r.test_ece:.2%} (this compressed "
            f"network, a point estimate); dense posterior predictive ({r.predictive_samples} "
            f"samples) NLL {r.dense_test_nll:.4f}, ECE {r.dense_test_ece:.2%}"
        )
    return lines
