"""Per-layer thresholds on the pruning quantity: given, or the valley of its histogram.

A group is pruned when its pruning quantity (the prior's ``log_dropout_rate``) is at or above its
layer's threshold. ``"auto"`` takes the valley between the two modes of the layer's histogram, as
the authors advise ("pick a value that separates the two modes"); where there are no two modes
far enough apart (the prior's ``mode_separation``), :data:`DEFAULT_THRESHOLD`. Thresholds chosen
for an error budget on validation data are in :mod:`pyro_bc.compression.budget`.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from ..checks import is_number
from ..priors import GroupPrior
from .arguments import per_layer

#: The threshold where a histogram has no two modes (the authors' usual value; for GNJ, the
#: scale's posterior standard deviation is 22% of its mean).
DEFAULT_THRESHOLD = -3.0
#: how far apart two modes must be when the prior does not say (``GroupPrior.mode_separation``)
MIN_MODE_SEPARATION = GroupPrior.mode_separation


def histogram_valley(
    values: torch.Tensor, bins: int | None = None, min_separation: float = MIN_MODE_SEPARATION
) -> float | None:
    """The valley between the two modes of the histogram of ``values``, or None if it has one.

    Otsu's split of the (lightly smoothed) histogram finds the two modes; the threshold is the
    centre of the lowest bin between their peaks. The histogram counts as bimodal only when that
    bin holds at most half as many values as the lower peak and the peaks are at least
    ``min_separation`` apart. ``+inf`` counts as the largest finite value (a group whose scale
    has mean zero is pruned by any threshold).

    Example::

        log_alpha = layer.prior.log_dropout_rate("fc1", 784, guide.distributions())
        histogram_valley(log_alpha)  # e.g. -0.4
    """
    v = values.detach().double().flatten().cpu()
    finite = v[torch.isfinite(v)]
    if finite.numel() < 4:
        return None
    v = v.clamp(finite.min().item(), finite.max().item())
    lo, hi = v.min().item(), v.max().item()
    if hi - lo < 1e-9:
        return None
    bins = bins or int(min(64, max(8, 2 * math.sqrt(v.numel()))))
    counts = torch.histc(v, bins, lo, hi)
    # [1, 2, 1] / 4 smoothing keeps a single empty bin inside a mode from looking like a valley.
    smooth = F.conv1d(counts[None, None], torch.tensor([[[0.25, 0.5, 0.25]]]).double(), padding=1)
    smooth = smooth.flatten()
    split = _otsu(smooth)
    left = int(smooth[:split].argmax())
    right = split + int(smooth[split:].argmax())
    between = smooth[left : right + 1]
    lowest = (between == between.min()).nonzero().flatten()
    valley = left + int(lowest[len(lowest) // 2])
    width = (hi - lo) / bins
    if smooth[valley] > 0.5 * min(smooth[left], smooth[right]):
        return None
    if (right - left) * width < min_separation:
        return None
    return lo + (valley + 0.5) * width


def _otsu(counts):
    centres = torch.arange(len(counts), dtype=torch.float64)
    best, split = -1.0, 1
    for k in range(1, len(counts)):
        w0, w1 = counts[:k].sum(), counts[k:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (counts[:k] * centres[:k]).sum() / w0
        m1 = (counts[k:] * centres[k:]).sum() / w1
        between = (w0 * w1 * (m0 - m1) ** 2).item()
        if between > best:
            best, split = between, k
    return split


def resolve_thresholds(thresholds, log_alphas: dict, separations: dict) -> dict:
    """``{layer: (threshold, rule)}`` from compress's ``thresholds`` argument.

    ``thresholds`` is None or ``"auto"`` (every layer's valley), a number, or a dict
    ``{layer: number or "auto"}`` (missing layers: ``"auto"``). The rule says how each was
    chosen: ``"given"``, ``"auto"`` or ``"auto: one mode, default"``.

    Example::

        resolve_thresholds({"fc1": -2.8}, log_alphas, {"fc1": 4.0, "fc2": 4.0})
        # {'fc1': (-2.8, 'given'), 'fc2': (-0.4, 'auto')}
    """
    names = list(log_alphas)
    thresholds = per_layer(thresholds, names, "thresholds", (Real, str), None)
    return {
        name: _threshold(name, thresholds[name], log_alphas[name], separations[name])
        for name in names
    }


def _threshold(name, value, log_alpha, separation):
    if value is None or isinstance(value, str):
        if value not in (None, "auto"):
            raise ValueError(
                f"compress: threshold of {name!r} is {value!r}; use a number or 'auto'"
            )
        valley = histogram_valley(log_alpha, min_separation=separation)
        if valley is None:
            return DEFAULT_THRESHOLD, "auto: one mode, default"
        return valley, "auto"
    if not is_number(value) or math.isnan(value):
        raise ValueError(f"compress: threshold of {name!r} must be a number, got {value!r}")
    return float(value), "given"
