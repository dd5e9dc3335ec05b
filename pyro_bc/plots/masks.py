"""What was pruned and why: weight matrices, kept inputs, histograms of the pruning quantity."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..compression import group_masks, histogram_valley
from .figures import (
    KEPT_COLOR,
    PRUNED_COLOR,
    PRUNED_LABEL,
    PRUNED_RGBA,
    panels,
    save,
)


def compress_masks(guide, compressed, thresholds, layers=None):
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
    :func:`~pyro_bc.compression.group_masks`).

    :param guide: a trained :class:`~pyro_bc.StructuredGuide`.
    :param compressed: the :class:`~pyro_bc.CompressedNetwork` compress returned for ``guide``;
        its thresholds are used. Or give ``thresholds`` (as for compress; default "auto").
    :param signed: draw ``E[w]`` with a diverging colormap instead of ``|E[w]|``.
    :param layers: names of the layers to draw (default: all).
    :param path: if given, the figure is also saved there (PNG, atomically).

    Example::

        fig = plots.weight_matrices(guide, thresholds="auto", path="weights.png")
    """
    masks = compress_masks(guide, compressed, thresholds, layers)
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
    save(fig, path)
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
    masks = compress_masks(guide, compressed, thresholds)
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
    save(fig, path)
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
    masks = compress_masks(guide, compressed, thresholds, layers)
    fig, axes = panels(len(masks))
    for ax, (name, m) in zip(axes, masks.items(), strict=False):
        values = _finite(m.log_alpha)
        below = m.below_threshold.cpu().numpy()
        edges = _edges(values, m.threshold, bins)
        ax.hist(values[below], bins=edges, color=KEPT_COLOR, label=f"kept ({below.sum()})")
        ax.hist(values[~below], bins=edges, color=PRUNED_COLOR, label=f"pruned ({(~below).sum()})")
        if math.isfinite(m.threshold):  # a layer the budget prunes nothing of has inf
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
        lines = [t for t in (m.threshold, valley) if t is not None and math.isfinite(t)]
        low, high = min([edges[0], *lines]), max([edges[-1], *lines])
        pad = 0.03 * (high - low)
        ax.set_xlim(low - pad, high + pad)
        title = f"{name}: {int(below.sum())} kept / {int((~below).sum())} pruned"
        extra = int(below.sum()) - int(m.groups_kept.sum())
        if extra:
            title += f"\n({extra} more removed by the layer after)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("log alpha = log Var[z] / E[z]^2")
        ax.set_ylabel("groups")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    save(fig, path)
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
