"""Figures of a Bayesian-compression run: what was pruned, why, and how many bits are left.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so it is safe in
scripts, tests and headless servers and never opens a window), and saves it when given ``path``
(written to a temporary file first, then renamed, so a reader never sees half a PNG). In a
notebook the returned figure displays itself.

The masks drawn are those :func:`pyro_bc.compress` applies: they come from
:func:`pyro_bc.group_masks`, which runs compress's own analysis. Pass either the
``thresholds`` you would pass to compress, or the ``compressed`` network itself (its report
holds the thresholds it used).

Example::

    from pyro_bc import plots

    compressed = pyro_bc.compress(guide, thresholds="auto")
    plots.weight_matrices(guide, compressed, path="weights.png")
    plots.pruning_histograms(guide, compressed=compressed)
    plots.bits_per_layer(compressed)
    plots.training_curves(history)
"""

from .bits import BitSweep, bit_sweep, bits_histograms, bits_per_layer, error_vs_bits
from .calibration import reliability_diagram
from .figures import KEPT_COLOR, PRUNED_COLOR, PRUNED_LABEL, PRUNED_RGBA
from .masks import kept_inputs, pruning_histograms, weight_matrices
from .training import tradeoff, training_curves

__all__ = [
    "KEPT_COLOR",
    "PRUNED_COLOR",
    "PRUNED_LABEL",
    "PRUNED_RGBA",
    "BitSweep",
    "bit_sweep",
    "bits_histograms",
    "bits_per_layer",
    "error_vs_bits",
    "kept_inputs",
    "pruning_histograms",
    "reliability_diagram",
    "tradeoff",
    "training_curves",
    "weight_matrices",
]
