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

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .compression import (
    compress,
    group_masks,
    histogram_valley,
    significand_bits,
    weight_bits,
)
from .files import write_atomically
from .predictive import DEFAULT_BINS, Calibration, calibration

__all__ = [
    "BitSweep",
    "bit_sweep",
    "bits_histograms",
    "bits_per_layer",
    "error_vs_bits",
    "kept_inputs",
    "pruning_histograms",
    "reliability_diagram",
    "training_curves",
    "weight_matrices",
]

#: colour of pruned rows, columns and filters, drawn over the weights
PRUNED_RGBA = (0.82, 0.82, 0.82, 0.93)
KEPT_COLOR = "tab:blue"
PRUNED_COLOR = "tab:red"
#: the label of the image that marks pruned weights (tests and users can find it by label)
PRUNED_LABEL = "pruned"


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _save(fig: Figure, path, dpi: int = 120) -> None:
    """Saves ``fig`` atomically (see :func:`pyro_bc.files.write_atomically`)."""
    if path is None:
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:].lower() or "png", dpi=dpi)
    write_atomically(path, buffer.getvalue())


def _panels(count):
    """A figure with one panel per layer, three to a row; the spare panels hidden."""
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def _masks(guide, compressed, thresholds, layers=None):
    """compress's masks for ``guide``: under ``thresholds``, or those ``compressed`` used."""
    input_shape = None
    if compressed is not None:
        if thresholds is not None:
            raise ValueError(
                "pass either compressed= (its report holds the thresholds) or thresholds=, not both"
            )
        report = getattr(compressed, "report", None)
        if report is None:
            raise ValueError(
                "this CompressedNetwork has no report (a network read back with pyro_bc.load "
                "does not know how it was made); pass the network compress() returned, or "
                "thresholds="
            )
        thresholds = {layer.name: layer.threshold for layer in report.layers}
        input_shape = compressed.input_shape
    masks = group_masks(guide, thresholds, input_shape=input_shape)
    if compressed is not None:
        for layer in compressed.report.layers:
            # how compress chose the threshold ("auto", "default", ...), not "given" as here
            masks[layer.name].threshold_rule = layer.threshold_rule
            kept = int(masks[layer.name].groups_kept.sum())
            if kept != layer.groups_kept:
                raise ValueError(
                    f"layer {layer.name!r}: the guide now keeps {kept} groups at threshold "
                    f"{layer.threshold:.3g}, the compressed network {layer.groups_kept}; the "
                    "guide changed after compress(). Compress it again."
                )
    if layers is not None:
        unknown = set(layers) - set(masks)
        if unknown:
            raise ValueError(
                f"layers {sorted(unknown)} are not Bayesian layers of the model; it has "
                f"{list(masks)}"
            )
        masks = {name: masks[name] for name in layers}
    return masks


def _finite(values: torch.Tensor) -> np.ndarray:
    """``values`` as float64 numpy with infinities clamped to the finite range (for histograms)."""
    v = values.detach().double().cpu().numpy()
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return np.zeros_like(v)
    return np.clip(v, finite.min(), finite.max())


# ---------------------------------------------------------------------------------------------
# Weight matrices


def _dense_picture(m):
    """The dense layer as drawn: rows = output units, columns = input features (its groups)."""
    values = m.weight_mean.detach().cpu().numpy()
    pruned = ~(m.out_keep[:, None] & m.in_keep[None, :]).cpu().numpy()
    return values, pruned


def _conv_picture(m):
    """A mosaic of kernels: one column of blocks per filter (its groups), one row per input
    channel, a one-pixel gap (NaN, drawn blank) between blocks."""
    w = m.weight_mean.detach().cpu().numpy()
    out_c, in_c, kh, kw = w.shape
    # (in, kh + 1, out, kw + 1) with a NaN row and column after each kernel, then flattened
    padded = np.full((in_c, kh + 1, out_c, kw + 1), np.nan)
    padded[:, :kh, :, :kw] = w.transpose(1, 2, 0, 3)
    pruned_blocks = ~(m.in_keep.cpu().numpy()[:, None] & m.out_keep.cpu().numpy()[None, :])
    pruned = np.zeros(padded.shape, dtype=bool)
    pruned[:, :kh, :, :kw] = pruned_blocks[:, None, :, None]
    shape = (in_c * (kh + 1), out_c * (kw + 1))
    return padded.reshape(shape)[:-1, :-1], pruned.reshape(shape)[:-1, :-1]


def weight_matrices(
    guide,
    compressed=None,
    *,
    thresholds=None,
    signed: bool = False,
    layers=None,
    path=None,
) -> Figure:
    """The posterior-mean weights of every Bayesian layer, with what compression removes greyed.

    One panel per layer, every panel drawn so that **each column is one group** (the unit a
    scale variable switches off):

    - dense layers: the matrix ``E[w]`` with rows = output units and columns = inputs. Grey
      columns are pruned groups (inputs); grey rows are outputs removed because the next layer
      no longer reads them.
    - convolutions: a mosaic of ``kh x kw`` kernels, one column of kernels per filter (its
      groups), one row per input channel. Grey columns are pruned filters; grey rows are input
      channels whose filter in the layer before was pruned.

    The masks are exactly those of :func:`pyro_bc.compress` (via
    :func:`~pyro_bc.compress.group_masks`).

    :param guide: a trained :class:`~pyro_bc.StructuredGuide`.
    :param compressed: the :class:`~pyro_bc.CompressedNetwork` compress returned for ``guide``;
        its thresholds are used. Or give ``thresholds`` (as for compress; default "auto").
    :param signed: draw ``E[w]`` with a diverging colormap instead of ``|E[w]|``.
    :param layers: names of the layers to draw (default: all).
    :param path: if given, the figure is also saved there (PNG, atomically).

    Example::

        fig = plots.weight_matrices(guide, thresholds="auto", path="weights.png")
    """
    masks = _masks(guide, compressed, thresholds, layers)
    pictures = {
        name: _dense_picture(m) if m.kind == "dense" else _conv_picture(m)
        for name, m in masks.items()
    }
    width = 10.0
    # Dense panels get a fixed height (aspect "auto"); conv mosaics keep square kernels.
    heights = []
    for name, (values, _) in pictures.items():
        if masks[name].kind == "dense":
            heights.append(2.8)
        else:
            heights.append(
                min(6.0, max(1.3, 0.8 * width * values.shape[0] / values.shape[1] + 0.9))
            )
    fig = Figure(figsize=(width, sum(heights) + 0.3), layout="constrained")
    axes = fig.subplots(len(pictures), 1, squeeze=False, height_ratios=heights)[:, 0]
    # Gaps between kernels are NaN: drawn in a colour no weight has (white is 0 in RdBu_r).
    cmap = matplotlib.colormaps["RdBu_r" if signed else "viridis"].with_extremes(
        bad="black" if signed else "white"
    )
    for ax, (name, (values, pruned)) in zip(axes, pictures.items(), strict=True):
        m = masks[name]
        shown = values if signed else np.abs(values)
        kept_values = np.abs(values[~pruned & np.isfinite(values)])
        # the 99th percentile, so that a few large weights do not wash out the rest
        vmax = float(np.quantile(kept_values, 0.99)) if kept_values.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        vmin = -vmax if signed else 0.0
        aspect = "auto" if m.kind == "dense" else "equal"
        image = ax.imshow(
            shown, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest"
        )
        overlay = np.zeros(pruned.shape + (4,))
        overlay[pruned] = PRUNED_RGBA
        ax.imshow(overlay, aspect=aspect, interpolation="nearest", label=PRUNED_LABEL)
        colorbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
        colorbar.set_label("E[w]" if signed else "|E[w]|")
        groups, kept = m.log_alpha.numel(), int(m.groups_kept.sum())
        if m.kind == "dense":
            other, other_kept = m.out_keep.numel(), int(m.out_keep.sum())
            ax.set_title(
                f"{name} (dense {other}x{groups}): {kept}/{groups} inputs kept (grey columns "
                f"pruned), {other_kept}/{other} outputs kept (grey rows)",
                fontsize=10,
            )
            ax.set_xlabel("input = group")
            ax.set_ylabel("output unit")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            other, other_kept = m.in_keep.numel(), int(m.in_keep.sum())
            ax.set_title(
                f"{name} (conv): {kept}/{groups} filters kept (grey columns pruned), "
                f"{other_kept}/{other} input channels kept (grey rows)",
                fontsize=10,
            )
            kh, kw = m.weight_mean.shape[2:]
            _block_ticks(ax.xaxis, groups, kw)
            _block_ticks(ax.yaxis, other, kh)
            ax.set_xlabel("filter = group")
            ax.set_ylabel("input channel")
    fig.suptitle(
        "Posterior-mean weights" + ("" if signed else " (magnitude)") + "; grey = removed",
        fontsize=11,
    )
    _save(fig, path)
    return fig


def kept_inputs(
    guide, compressed=None, *, thresholds=None, layer=None, image_shape=None, path=None
) -> Figure:
    """The inputs a dense layer keeps, drawn as an image: for a first layer that reads pixels,
    the pixels the compressed network still looks at.

    Kept inputs are drawn in blue, pruned ones in the grey of :func:`weight_matrices`, with
    fixed colours, so that a layer that keeps everything is a blue square, not a blank one.

    :param compressed: the network compress returned (its thresholds are used), or give
        ``thresholds`` (as for compress).
    :param layer: the dense layer's name; default the first Bayesian layer, which must be dense.
    :param image_shape: ``(height, width)`` of the picture; default the model's input shape
        when its last two dimensions hold one group per input (e.g. ``(1, 28, 28)`` for 784).
    :param path: if given, the figure is also saved there (PNG, atomically).

    Example::

        plots.kept_inputs(guide, compressed)  # LeNet-300-100: the pixels fc1 still reads
    """
    masks = _masks(guide, compressed, thresholds)
    name = next(iter(masks)) if layer is None else layer
    if name not in masks:
        raise ValueError(f"kept_inputs: no Bayesian layer {name!r}; the model has {list(masks)}")
    m = masks[name]
    if m.kind != "dense":
        raise ValueError(
            f"kept_inputs: layer {name!r} is a convolution, whose groups are filters, not "
            "inputs; pass layer= a dense layer (weight_matrices draws every layer)"
        )
    kept = m.groups_kept.detach().cpu().numpy()
    if image_shape is None:
        input_shape = getattr(guide.model, "input_shape", None) or ()
        image_shape = tuple(input_shape[-2:])
    if len(image_shape) != 2 or math.prod(image_shape) != kept.size:
        raise ValueError(
            f"kept_inputs: layer {name!r} has {kept.size} inputs, which do not make an image of "
            f"shape {tuple(image_shape)}; pass image_shape=(height, width)"
        )
    fig = Figure(figsize=(3.4, 3.6), layout="constrained")
    ax = fig.subplots()
    cmap = ListedColormap([PRUNED_RGBA[:3], KEPT_COLOR])
    ax.imshow(
        kept.reshape(image_shape).astype(float), cmap=cmap, vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name}: {int(kept.sum())} of {kept.size} inputs kept", fontsize=10)
    handles = [Patch(color=KEPT_COLOR, label="kept"), Patch(color=PRUNED_RGBA, label="pruned")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    _save(fig, path)
    return fig


def _block_ticks(axis, count, size):
    """Ticks at the centres of mosaic blocks, labelled with the block index (at most ~10)."""
    step = max(1, math.ceil(count / 10))
    index = np.arange(0, count, step)
    axis.set_ticks(index * (size + 1) + (size - 1) / 2)
    axis.set_ticklabels([str(i) for i in index])


# ---------------------------------------------------------------------------------------------
# Histograms of the pruning quantity


def pruning_histograms(
    guide,
    thresholds=None,
    *,
    compressed=None,
    bins: int = 50,
    layers=None,
    path=None,
) -> Figure:
    """Per layer, the histogram of the pruning quantity log alpha, with the threshold drawn.

    ``log alpha = log Var[z] / E[z]^2`` of each group's scale (``prior.log_dropout_rate``): a
    group whose scale is mostly noise has a large log alpha and is pruned. Groups kept are blue,
    pruned red; the solid black line is the threshold compress applies (``thresholds`` as for
    compress, or the ones ``compressed`` used). The dashed line is the valley ``"auto"`` would
    choose, when the histogram has two modes and the threshold is elsewhere. The title counts the
    layer's own groups on each side; propagation through the chain may remove a few more (noted
    when it does). Infinite log alphas (a scale with mean 0) are counted in the last bin.

    Example::

        fig = plots.pruning_histograms(guide, thresholds={"fc1": -2.8, "fc3": -5})
    """
    masks = _masks(guide, compressed, thresholds, layers)
    fig, axes = _panels(len(masks))
    for ax, (name, m) in zip(axes, masks.items(), strict=False):
        values = _finite(m.log_alpha)
        below = m.below_threshold.cpu().numpy()
        edges = _edges(values, m.threshold, bins)
        ax.hist(values[below], bins=edges, color=KEPT_COLOR, label=f"kept ({below.sum()})")
        ax.hist(values[~below], bins=edges, color=PRUNED_COLOR, label=f"pruned ({(~below).sum()})")
        ax.axvline(
            m.threshold,
            color="black",
            linewidth=1.5,
            label=f"threshold {m.threshold:.3g} ({m.threshold_rule})",
        )
        valley = histogram_valley(m.log_alpha, min_separation=m.mode_separation)
        if valley is not None and abs(valley - m.threshold) > 1e-9:
            ax.axvline(
                valley, color="tab:orange", linestyle="--", label=f"valley ('auto') {valley:.3g}"
            )
        lines = [m.threshold] + ([] if valley is None else [valley])
        pad = 0.03 * (max(edges[-1], *lines) - min(edges[0], *lines))
        ax.set_xlim(min(edges[0], *lines) - pad, max(edges[-1], *lines) + pad)
        title = f"{name}: {int(below.sum())} kept / {int((~below).sum())} pruned"
        extra = int(below.sum()) - int(m.groups_kept.sum())
        if extra:
            title += f"\n({extra} more removed by the layer after)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("log alpha = log Var[z] / E[z]^2")
        ax.set_ylabel("groups")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def _edges(values, threshold, bins):
    """Histogram bins over the data's range (so a narrow histogram keeps its shape), with the
    threshold as an edge when it falls inside, so no bar mixes kept and pruned groups."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    if not lo < threshold < hi:
        return np.linspace(lo, hi, bins + 1)
    width = (hi - lo) / bins
    left = max(1, round((threshold - lo) / width))
    right = max(1, round((hi - threshold) / width))
    return np.concatenate(
        [np.linspace(lo, threshold, left + 1)[:-1], np.linspace(threshold, hi, right + 1)]
    )


# ---------------------------------------------------------------------------------------------
# Bits


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
    _save(fig, path)
    return fig


def bits_histograms(guide, thresholds=None, *, compressed=None, layers=None, path=None) -> Figure:
    """Per layer, how many bits each kept weight's posterior variance allows, and the layer's t.

    A weight with posterior variance ``Var[w]`` deserves the ``t`` in 1..23 with
    ``2 Var[w] < 2^-t`` (:func:`~pyro_bc.compress.weight_bits`): with the largest such ``t``,
    rounding to the grid ``2^-t`` moves it by at most ``2^-(t+1) <= 2 Var[w]``, far below its
    posterior standard deviation when the variance is small. The layer gets the ceiling
    of the mean over its kept weights (solid line, :func:`~pyro_bc.compress.significand_bits`,
    what ``compress(bits="auto")`` uses); the dashed line is the mean itself.

    Example::

        fig = plots.bits_histograms(guide, compressed=compressed)
    """
    masks = _masks(guide, compressed, thresholds, layers)
    fig, axes = _panels(len(masks))
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
    _save(fig, path)
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
        FuncFormatter(lambda v, _: f"{v:g}" if _leading(v) in (2, 5) else "")
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
    _save(fig, path)
    return fig


def _leading(value: float) -> int:
    """The leading digit of a positive number (2 for 0.2, 20 and 200)."""
    return int(round(value / 10 ** math.floor(math.log10(value)), 6))


# ---------------------------------------------------------------------------------------------
# Training curves


def training_curves(history, *, path=None) -> Figure:
    """Loss, errors and (if recorded) kept groups per epoch, from :func:`pyro_bc.fit`'s history.

    ``history`` is a :class:`pyro_bc.infer.History` or a list of per-epoch dicts. Panels:
    the loss (the negative ELBO per step, log scale when positive); the train and test errors
    when recorded; and the kept groups per layer when the records hold a ``"kept_groups"`` dict
    (as a ``fit`` callback can store, see ``benchmarks/reproduce.py``).

    Example::

        history = pyro_bc.fit(model, guide, train_loader, epochs=50, test_loader=test_loader)
        fig = plots.training_curves(history)
    """
    records = list(getattr(history, "epochs", history))
    if not records:
        raise ValueError("training_curves: the history has no epochs")
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]

    def series(key):
        return [r.get(key) for r in records]

    panels = ["loss"]
    if any(r.get("train_error") is not None or r.get("test_error") is not None for r in records):
        panels.append("error")
    if any(isinstance(r.get("kept_groups"), dict) for r in records):
        panels.append("kept")
    fig = Figure(figsize=(4.2 * len(panels), 3.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    style = ".-" if len(records) <= 50 else "-"  # markers only while they stay readable
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "loss":
            loss = np.array([np.nan if v is None else v for v in series("loss")], dtype=float)
            ax.plot(epochs, loss, style)
            if np.nanmin(loss) > 0:
                ax.set_yscale("log")
            ax.set_ylabel("loss (negative ELBO per step)")
            ax.set_title("loss", fontsize=10)
        elif panel == "error":
            for key, label in (("train_error", "train (sampled)"), ("test_error", "test (means)")):
                values = series(key)
                points = [
                    (e, 100 * v) for e, v in zip(epochs, values, strict=True) if v is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=label)
            ax.set_ylabel("error (%)")
            ax.set_title("error", fontsize=10)
            ax.legend(fontsize=8)
        else:
            names = []
            for r in records:
                for name in r.get("kept_groups") or {}:
                    if name not in names:
                        names.append(name)
            for name in names:
                points = [
                    (e, r["kept_groups"][name])
                    for e, r in zip(epochs, records, strict=True)
                    if isinstance(r.get("kept_groups"), dict) and name in r["kept_groups"]
                ]
                ax.plot(*zip(*points, strict=True), style, label=name)
            ax.set_ylabel("groups kept")
            ax.set_title("kept groups per layer", fontsize=10)
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------
# Calibration


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
    _save(fig, path)
    return fig


def tradeoff(curves: dict, *, paper=None, chosen=None, title=None, path=None) -> Figure:
    """Test error against compression rate, after pruning and after precision: two panels.

    ``curves`` maps a label to a list of points, each a dict with ``pruning_rate``,
    ``precision_rate`` and ``test_error`` (a fraction), e.g. one point per error budget or per
    threshold. ``paper`` (same keys; ``precision_rate`` may be None) is drawn as a star,
    ``chosen`` circled.

    Example::

        points = [pyro_bc.compress(guide, thresholds=t).report.to_dict() for t in (-3, -1, 1)]
        fig = plots.tradeoff({"one threshold": points}, chosen=points[0])
    """
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, name in zip(
        axes, ("pruning_rate", "precision_rate"), ("after pruning", "after precision"), strict=True
    ):
        for label, points in curves.items():
            points = sorted(points, key=lambda p: p[key])
            ax.plot(
                [p[key] for p in points],
                [100 * p["test_error"] for p in points],
                "o-",
                markersize=4,
                label=label,
            )
        if paper is not None and paper.get(key) is not None:
            ax.plot(
                [paper[key]],
                [100 * paper["test_error"]],
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label="paper",
            )
        if chosen is not None:
            ax.plot(
                [chosen[key]],
                [100 * chosen["test_error"]],
                marker="o",
                markersize=14,
                markerfacecolor="none",
                markeredgecolor="black",
                linestyle="none",
                label="chosen (validation)",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(f"compression rate {name} (x)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test error (%)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return fig
