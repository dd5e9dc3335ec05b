"""How many bits are left: bit widths per layer and error against precision."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..compression import compress, significand_bits, weight_bits
from .figures import (
    KEPT_COLOR,
    leading,
    panels,
    save,
)
from .masks import compress_masks


def bits_per_layer(compressed, *, path=None) -> Figure:
    """Per layer, the fraction bits ``t`` and the bits per weight in the paper's and the file's
    accounting, from ``compressed.report``.

    Three bars per layer: ``t`` (fraction bits, the paper's rule from the posterior variances),
    ``1 + e + t`` (the paper's accounting: sign, one global exponent width ``e``, ``t``) and the
    fixed-point width the ``.bc`` file really stores (sign, the integer bits the largest weight
    needs, ``t``). A layer kept in float32 (``bits=None``) shows 32 and no ``t``.

    Example::

        fig = plots.bits_per_layer(pyro_bc.compress(guide))
    """
    report = getattr(compressed, "report", None)
    if report is None:
        raise ValueError(
            "bits_per_layer needs the report of compress() (a network read back with "
            "pyro_bc.load has none); pass the network compress() returned"
        )
    names = [layer.name for layer in report.layers]
    series = {
        "t (fraction bits)": [layer.frac_bits or 0 for layer in report.layers],
        f"1 + e + t (paper, e = {report.exponent_bits})": [
            layer.paper_bits for layer in report.layers
        ],
        "file width (.bc)": [layer.file_bits for layer in report.layers],
    }
    fig = Figure(figsize=(max(5.0, 1.6 * len(names) + 2.5), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.27
    for k, (label, values) in enumerate(series.items()):
        bars = ax.bar(x + (k - 1) * width, values, width, label=label)
        texts = [
            "-" if k == 0 and layer.frac_bits is None else str(v)
            for v, layer in zip(values, report.layers, strict=True)
        ]
        ax.bar_label(bars, texts, fontsize=8, padding=1)
    ax.set_xticks(x, names)
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, max(max(v) for v in series.values()) * 1.2 + 1)
    ax.set_title(
        f"Bits per layer. Compression x{report.pruning_rate:.1f} after pruning, "
        f"x{report.precision_rate:.1f} after precision, x{report.file_rate:.1f} as a file",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    save(fig, path)
    return fig


def bits_histograms(guide, thresholds=None, *, compressed=None, layers=None, path=None) -> Figure:
    """Per layer, how many bits each kept weight's posterior variance allows, and the layer's t.

    A weight with posterior variance ``Var[w]`` deserves the ``t`` in 1..23 with
    ``2 Var[w] < 2^-t`` (:func:`~pyro_bc.compression.weight_bits`): with the largest such ``t``,
    rounding to the grid ``2^-t`` moves it by at most ``2^-(t+1) <= 2 Var[w]``, far below its
    posterior standard deviation when the variance is small. The layer gets the ceiling
    of the mean over its kept weights (solid line, :func:`~pyro_bc.compression.significand_bits`,
    what ``compress(bits="auto")`` uses); the dashed line is the mean itself.

    Example::

        fig = plots.bits_histograms(guide, compressed=compressed)
    """
    masks = compress_masks(guide, compressed, thresholds, layers)
    fig, axes = panels(len(masks))
    for ax, (name, m) in zip(axes, masks.items(), strict=False):
        var = m.weight_var[m.weight_kept]
        per_weight = weight_bits(var).cpu().numpy()
        t = significand_bits(var)
        edges = np.arange(-0.5, 24.5)
        ax.hist(per_weight, bins=edges, color=KEPT_COLOR)
        ax.axvline(per_weight.mean(), color="black", linestyle="--", label="mean")
        ax.axvline(t, color="black", label=f"t = ceil(mean) = {t}")
        ax.set_title(f"{name}: {per_weight.size:,} kept weights, t = {t}", fontsize=10)
        ax.set_xlabel("bits the weight's posterior allows")
        ax.set_ylabel("weights")
        ax.set_xlim(-0.5, 23.5)
        ax.legend(fontsize=8)
    save(fig, path)
    return fig


@dataclass
class BitSweep:
    """Test errors of compressed networks for a sweep of fraction bits: see :func:`bit_sweep`.

    :ivar bits: the fraction bits ``t`` tried (the same for every layer).
    :ivar errors: the test error at each of them.
    :ivar auto_bits: ``{layer: t}`` that ``compress(bits="auto")`` chose.
    :ivar auto_error: the test error of that network.
    :ivar auto_mean_bits: ``t`` averaged over the kept weights of the automatic choice.
    :ivar float32_error: the test error of the pruned network without quantization.
    :ivar num_classes: the number of classes; with too few bits every weight rounds to zero and
        the error sits at chance, ``1 - 1 / num_classes`` (90% for ten classes).

    Example::

        sweep = plots.bit_sweep(guide, test_loader)
        print(sweep)
    """

    bits: list
    errors: list
    auto_bits: dict = field(default_factory=dict)
    auto_error: float = math.nan
    auto_mean_bits: float = math.nan
    float32_error: float = math.nan
    num_classes: int | None = None

    @property
    def chance_error(self) -> float:
        """The error of a constant prediction: ``1 - 1 / num_classes`` (NaN if unknown)."""
        return math.nan if not self.num_classes else 1.0 - 1.0 / self.num_classes

    def __str__(self):
        lines = ["t (all layers)  test error"]
        lines += [f"{t:>14}  {e:.2%}" for t, e in zip(self.bits, self.errors, strict=True)]
        auto = ", ".join(f"{k} {v}" for k, v in self.auto_bits.items())
        lines.append(f"automatic ({auto}): {self.auto_error:.2%}")
        lines.append(f"float32 (pruned, not quantized): {self.float32_error:.2%}")
        return "\n".join(lines)


@torch.no_grad()
def bit_sweep(guide, test_loader, bits=range(0, 13), *, thresholds=None) -> BitSweep:
    """Compresses ``guide`` with ``bits=t`` for every ``t`` in ``bits`` and measures test errors.

    Also measures the automatic choice (``bits="auto"``) and the pruned float32 network
    (``bits=None``), all at the same ``thresholds``. The data behind :func:`error_vs_bits`.

    Example::

        sweep = plots.bit_sweep(guide, test_loader, bits=range(2, 11))
        sweep.auto_bits, sweep.auto_error
    """
    bits = [int(t) for t in bits]
    errors = [compress(guide, thresholds, bits=t).evaluate(test_loader)["error"] for t in bits]
    auto = compress(guide, thresholds)
    layers = auto.report.layers
    x, _ = next(iter(test_loader))
    num_classes = auto(x[:1].to(next(auto.parameters()).device)).shape[-1]
    mean_bits = sum(layer.frac_bits * layer.weights_kept for layer in layers) / sum(
        layer.weights_kept for layer in layers
    )
    return BitSweep(
        bits=bits,
        errors=errors,
        auto_bits={layer.name: layer.frac_bits for layer in layers},
        auto_error=auto.evaluate(test_loader)["error"],
        auto_mean_bits=mean_bits,
        float32_error=compress(guide, thresholds, bits=None).evaluate(test_loader)["error"],
        num_classes=num_classes,
    )


def error_vs_bits(sweep: BitSweep, *, path=None) -> Figure:
    """Test error against the fraction bits of every layer, with the automatic choice marked.

    The curve is ``compress(guide, bits=t)`` for each ``t`` of the sweep; the dotted line is the
    pruned network in float32; the star is ``compress(guide)``'s per-layer choice from the
    posterior variances, drawn at its mean ``t`` over the kept weights. The dashed line, with
    its own tick, is chance (90% error for ten classes): the plateau of too few bits, where
    every weight rounds to zero.

    Example::

        fig = plots.error_vs_bits(plots.bit_sweep(guide, test_loader))
    """
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(sweep.bits, np.array(sweep.errors) * 100, "o-", label="same t for every layer")
    ax.axhline(
        sweep.float32_error * 100, color="gray", linestyle=":", label="float32 (pruned only)"
    )
    chance = sweep.chance_error * 100
    if math.isfinite(chance):
        ax.axhline(
            chance, color="black", linestyle="--", linewidth=0.8, label=f"chance ({chance:.0f}%)"
        )
    auto = ", ".join(f"{k}: {v}" for k, v in sweep.auto_bits.items())
    ax.plot(
        [sweep.auto_mean_bits],
        [sweep.auto_error * 100],
        marker="*",
        markersize=16,
        color="tab:red",
        linestyle="none",
        label=f"automatic ({auto})",
    )
    ax.set_yscale("log")
    # plain numbers (2, 5, 10) read better than 10^x on an axis of percentages
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:g}" if leading(v) in (2, 5) else "")
    )
    if math.isfinite(chance):
        # the plateau of too few bits gets a labelled tick of its own (90, not 50 or 100)
        low, high = ax.get_ylim()
        ax.set_ylim(low, max(high, chance * 1.15))
        ticks = [t for t in ax.get_yticks() if abs(math.log10(t / chance)) > 0.05]
        ax.set_yticks(sorted(ticks + [chance]))
        ax.set_ylim(low, max(high, chance * 1.15))
    ax.set_xlabel("fraction bits t (grid 2^-t)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error of the compressed network against precision", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save(fig, path)
    return fig
