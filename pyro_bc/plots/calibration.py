"""How well the predictive probabilities are calibrated: reliability diagrams."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..predictive import DEFAULT_BINS, Calibration, calibration
from .figures import (
    save,
)


def _calibrations(results, num_bins):
    """``{label: Calibration}`` from the forms :func:`reliability_diagram` takes."""
    if isinstance(results, (Calibration, tuple)):
        results = [results]
    if not isinstance(results, dict):
        results = {
            getattr(r, "predictor", "") or f"predictor {i + 1}": r for i, r in enumerate(results)
        }
    curves = {}
    for label, result in results.items():
        if isinstance(result, tuple) and len(result) == 2:
            result = calibration(*result, num_bins=num_bins)
        if not isinstance(result, Calibration):
            raise TypeError(
                f"reliability_diagram: {label!r} is a {type(result).__name__}; pass a "
                "pyro_bc.predictive.Calibration or a (probs, labels) pair"
            )
        curves[str(label)] = result
    if not curves:
        raise ValueError("reliability_diagram: nothing to draw")
    return curves


def reliability_diagram(results, *, num_bins: int = DEFAULT_BINS, path=None) -> Figure:
    """Accuracy against confidence per bin, for one or several predictors on one plot.

    ``results`` is a :class:`~pyro_bc.predictive.Calibration` (e.g. from
    :func:`~pyro_bc.predictive.predictive_metrics`), a ``(probs, labels)`` pair, a list of them,
    or a dict ``{label: either}``. Each curve joins the bins' (mean confidence, accuracy) points
    (empty bins are skipped); a calibrated predictor lies on the diagonal, one below it is
    overconfident. The legend gives each curve's expected calibration error; the lower panel
    shows the share of examples in each of the ``num_bins`` equal-width bins (``num_bins`` is
    used for ``(probs, labels)`` pairs; a ``Calibration`` keeps its own bins). The metrics are
    defined in ``docs/method.md#predictive-uncertainty``.

    Example::

        dense = predictive.predictive_metrics(model, guide, test_loader, num_samples=20)
        small = predictive.network_metrics(compressed, test_loader)
        fig = plots.reliability_diagram({"dense, predictive": dense, "compressed": small})
    """
    curves = _calibrations(results, num_bins)
    fig = Figure(figsize=(5.2, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    for label, c in curves.items():
        filled = c.bin_count > 0
        confidence = c.bin_confidence[filled].numpy()
        accuracy = c.bin_accuracy[filled].numpy()
        (line,) = top.plot(
            confidence, accuracy, "o-", markersize=4, label=f"{label} (ECE {c.ece:.4f})"
        )
        edges = np.linspace(0, 1, c.num_bins + 1)
        share = np.concatenate([c.bin_count.numpy() / c.n, [0]])
        bottom.step(edges, share, where="post", color=line.get_color())
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_title("Reliability diagram", fontsize=10)
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    smallest = min(float((c.bin_count[c.bin_count > 0] / c.n).min()) for c in curves.values())
    bottom.set_ylim(smallest / 2, 1.5)
    bottom.set_xlabel("confidence (largest class probability)")
    bottom.set_ylabel("examples")
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}" if v >= 0.01 else ""))
    bottom.grid(alpha=0.3)
    save(fig, path)
    return fig
