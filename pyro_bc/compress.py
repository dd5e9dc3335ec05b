"""Compression of a trained guide: posterior summaries -> masks -> thinned layers -> bit widths.

:func:`compress` is a pure function of a guide (plus thresholds): it reads the posterior of every
Bayesian layer of ``guide.model`` and returns a :class:`CompressedNetwork`, an ordinary
``torch.nn.Sequential`` of smaller ``nn.Linear`` / ``nn.Conv2d`` layers (neurons and filters
removed, not zeroed) whose weights are the posterior means rounded to a per-layer fixed-point
grid. The steps, following PAPER.md:

1. **Summaries.** ``E[w] = E[z] mu``, ``Var[w] = E[z]^2 sigma^2 + Var[z] (mu^2 + sigma^2)`` with
   ``z`` broadcast along the input side of dense layers and the output side of convolutions;
   biases: ``mu_b`` (dense) and ``E[z] mu_b`` (conv, whose scale multiplies the bias too).
2. **Masks.** A group is pruned when its prior's pruning quantity (``log_dropout_rate``, the log
   alpha of PAPER.md) is ``>=`` the layer's threshold. Masks then propagate through the chain: a
   pruned input of a dense layer removes the matching output of the Bayesian layer before it
   (row and bias of a dense layer; a filter of a convolution once *all* of its flattened inputs
   are pruned); a pruned filter removes that input channel of the next convolution and its
   ``H x W`` block of the next dense layer's inputs. Inputs a dense layer no longer reads are
   dropped by a :class:`Gather` in front of it (the pruned pixels in front of LeNet-300-100's
   fc1). Only modules with ``f(0) = 0`` that act per channel may sit between Bayesian layers, so
   a removed unit contributes exactly what the posterior-mean network with that group's scale set
   to zero would.
3. **Bit widths.** PAPER.md's rule over the *kept* weights: per weight, the number of ``t`` in
   1..23 with ``2 Var[w] < 2^-t``; per layer ``t_l = ceil(mean)``. Weights are rounded to the grid
   ``2^-t_l`` (round half up, as the authors' code), and the network computes with exactly these
   values.

**Number format.** Each layer's weights are stored as fixed-point integers ``q = w 2^t_l`` in
two's complement with the smallest width ``B_l`` that holds them: 1 sign bit, the integer bits
that ``max |w|`` needs (negative when every weight is below 1/2: leading zero fraction bits are
not stored) and ``t_l`` fraction bits. Every ``q 2^-t_l`` is exactly a float32, so the network,
the file and the report agree (the authors measured accuracy on a fixed-point grid but the size
of a float format). The report shows both the paper's accounting, ``1 + e + t_l`` bits per
weight with one global exponent width ``e`` (:func:`exponent_bits`), and ``B_l``, the file's real
bits; see :mod:`pyro_bc.codec` for what else the file holds.

Example::

    compressed = pyro_bc.compress(guide, thresholds={"fc1": -2.8, "fc2": -3, "fc3": -5})
    print(compressed.report)
    compressed.save("lenet300.bc")
"""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .nn import BayesianConv2d, BayesianLayer, BayesianLinear
from .priors import GroupPrior

#: The threshold on log alpha used when none is given (see :func:`compress`).
DEFAULT_THRESHOLD = -3.0
#: how far apart (in units of the pruning quantity) two modes must be to count as "kept" and
#: "pruned" when the prior does not say (:attr:`GroupPrior.mode_separation`); early in training
#: the histogram has bumps a few nats apart that are neither
MIN_MODE_SEPARATION = GroupPrior.mode_separation
#: The largest number of fraction bits the bit-width rule assigns (float32's significand).
MAX_FRACTION_BITS = 23
#: The widest fixed-point integer a layer may need.
MAX_WIDTH = 32

#: Modules that may sit between Bayesian layers: they act per channel and map 0 to 0.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh)
POOLING = (nn.MaxPool2d, nn.AvgPool2d)
#: Modules that are the identity at inference; the compressed network leaves them out.
DROPPED = (nn.Identity, nn.Dropout)
SUPPORTED = (
    "BayesianLinear, BayesianConv2d (groups=1), ReLU, LeakyReLU, Tanh, MaxPool2d, AvgPool2d, "
    "Flatten (start_dim=1, end_dim=-1), Identity and Dropout, in an nn.Sequential chain"
)


class Gather(nn.Module):
    """Keeps the features at ``index`` of the last dimension: the inputs a dense layer still reads.

    Example::

        gather = Gather(torch.tensor([0, 2, 5]), in_features=6)
        gather(torch.arange(6.0).expand(2, 6))  # tensor([[0., 2., 5.], [0., 2., 5.]])
    """

    def __init__(self, index, in_features: int):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1 or (index.numel() and not 0 <= index.min() <= index.max()):
            raise ValueError("Gather: index must be a 1-d tensor of non-negative positions")
        if index.numel() and index.max() >= in_features:
            raise ValueError(f"Gather: index {int(index.max())} >= in_features ({in_features})")
        self.in_features = in_features
        self.register_buffer("index", index)

    @property
    def out_features(self) -> int:
        return self.index.numel()

    def forward(self, x):
        return x.index_select(-1, self.index)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CompressedNetwork(nn.Sequential):
    """A compressed network: an ordinary ``nn.Sequential`` with its number formats and report.

    :ivar input_shape: the shape of one example, e.g. ``(1, 28, 28)``.
    :ivar formats: ``{layer name: t}``, the fraction bits of each fixed-point layer (weights
        ``q 2^-t``), or None for a layer kept in float32 (``compress(..., bits=None)``).
    :ivar report: the :class:`CompressionReport` of :func:`compress`; None after
        :func:`pyro_bc.load` (the file holds the network, not how it was made).

    Example::

        compressed = pyro_bc.compress(guide)
        logits = compressed(x)
        compressed.save("lenet300.bc")
        assert torch.equal(pyro_bc.load("lenet300.bc")(x), logits)
    """

    def __init__(self, layers: OrderedDict, *, input_shape=None, formats=None, report=None):
        super().__init__(layers)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.formats = dict(formats or {})
        self.report = report

    def save(self, path) -> int:
        """Writes the network to ``path`` (atomically; see :mod:`pyro_bc.codec`); returns bytes.

        Example::

            compressed.save("lenet300.bc")
        """
        from .codec import save

        return save(self, path)

    def to_bytes(self) -> bytes:
        """The file :meth:`save` writes, as bytes.

        Example::

            size = len(compressed.to_bytes())
        """
        from .codec import encode

        return encode(self)

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Test error of the network on ``(x, y)`` batches: ``{"error": ..., "n": ...}``.

        Example::

            compressed.evaluate(test_loader)  # {'error': 0.018, 'n': 10000}
        """
        self.eval()
        errors = seen = 0
        for x, y in loader:
            errors += (self(x).argmax(-1) != y).sum().item()
            seen += len(y)
        if seen == 0:
            raise ValueError("evaluate: the loader yielded no examples")
        return {"error": errors / seen, "n": seen}


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class LayerReport:
    """What compression did to one Bayesian layer (see :class:`CompressionReport`).

    ``groups_below_threshold`` counts the layer's own groups under its threshold;
    ``groups_kept`` the groups left after masks propagated through the chain. ``paper_bits`` is
    ``1 + e + t`` (PAPER.md's accounting), ``file_bits`` the width the file really stores.

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
    threshold_rule: str
    weights: int
    weights_kept: int
    biases: int
    biases_kept: int
    kept_shape: tuple
    frac_bits: int | None  # t_l; None when kept in float32
    paper_bits: int  # 1 + e + t_l per weight (32 in float32)
    file_bits: int  # the width stored in the file (32 in float32)
    macs: int
    macs_kept: int


@dataclass
class CompressionReport:
    """Per-layer and total numbers of a compression: ``print(report)``, ``report.to_dict()``.

    Rates follow PAPER.md's accounting: ``pruning_rate = |W| / |W kept|`` and
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
        """PAPER.md's "after pruning" rate ``|W| / |W kept|``."""
        return self.weights / self.weights_kept

    @property
    def paper_bits_total(self) -> int:
        """``sum_l |W_l kept| (1 + e + t_l)``: the kept weights' size in PAPER.md's accounting."""
        return sum(layer.weights_kept * layer.paper_bits for layer in self.layers)

    @property
    def precision_rate(self) -> float:
        """PAPER.md's "after precision" rate ``32 |W| / sum_l |W_l kept| (1 + e + t_l)``."""
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

        Example::

            json.dump(compressed.report.to_dict(), open("report.json", "w"), indent=2)
        """
        return {
            "layers": [asdict(layer) for layer in self.layers],
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
        }

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as a JSON string (``kwargs`` go to ``json.dumps``).

        Example::

            Path("report.json").write_text(compressed.report.to_json(indent=2))
        """
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return "\n".join(_format_report(self))


def _format_report(r):
    rows = [("layer", "groups kept", "threshold", "weights kept", "t", "bits paper/file", "MACs")]
    for layer in r.layers:
        rows.append(
            (
                f"{layer.name} ({layer.kind})",
                f"{layer.groups_kept}/{layer.groups}",
                f"{layer.threshold:.3g} ({layer.threshold_rule})",
                f"{layer.weights_kept:,}/{layer.weights:,}",
                "-" if layer.frac_bits is None else str(layer.frac_bits),
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
    if r.test_error is not None:
        dense = ""
        if r.dense_test_error is not None:
            dense = f"; dense posterior-mean network {r.dense_test_error:.2%}"
        lines.append(
            f"test error       {r.test_error:.2%} on {r.test_examples:,} examples "
            f"(this compressed network{dense})"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Thresholds and bit widths


def histogram_valley(
    values: torch.Tensor, bins: int | None = None, min_separation: float = MIN_MODE_SEPARATION
) -> float | None:
    """The valley between the two modes of the histogram of ``values``, or None if it has one.

    Otsu's split of the (lightly smoothed) histogram finds the two modes; the threshold is the
    centre of the lowest bin between their peaks. The histogram counts as bimodal only when that
    bin holds at most half as many values as the lower peak and the peaks are at least
    ``min_separation`` apart. ``+inf`` counts as the largest
    finite value (a group whose scale has mean zero is pruned by any threshold).

    Example::

        log_alpha = layer.prior.log_dropout_rate("fc1", 784, guide.distributions())
        histogram_valley(log_alpha)  # e.g. -0.4
    """
    v = values.detach().double().flatten()
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


def significand_bits(weight_var: torch.Tensor) -> int:
    """PAPER.md's fraction bits of a layer from the posterior variances of its kept weights.

    Per weight, the number of ``t`` in 1..23 with ``2 Var[w] < 2^-t`` (a weight whose posterior
    is wide needs few bits); for the layer, the ceiling of their mean.

    Example::

        significand_bits(torch.tensor([1e-3, 1e-5]))  # per weight 8 and 15 -> ceil(11.5) = 12
    """
    if weight_var.numel() == 0:
        raise ValueError("significand_bits: the layer has no kept weights")
    counts = weight_bits(weight_var).flatten()
    total, n = int(counts.sum()), counts.numel()
    return -(-total // n)  # exact integer ceiling of the mean


def weight_bits(weight_var: torch.Tensor) -> torch.Tensor:
    """Per weight, the number of ``t`` in 1..23 with ``2 Var[w] < 2^-t``: the bits it deserves.

    The per-weight half of :func:`significand_bits` (which takes the ceiling of their mean over a
    layer's kept weights); same shape as ``weight_var``, dtype int64.

    Example::

        weight_bits(torch.tensor([1e-3, 1e-5, 0.3]))  # tensor([ 8, 15,  0])
    """
    two_var = 2 * weight_var.detach().double()
    return sum((two_var < 2.0**-t).long() for t in range(1, MAX_FRACTION_BITS + 1))


def exponent_bits(max_abs_weight: float) -> int:
    """The paper's global exponent width ``e = ceil(log2(log2(m) + 1) + 1)``, ``m = max |E[w]|``.

    The authors' formula is undefined for ``m <= 1/2`` and gives 1 or less (even negative
    values) for ``1/2 < m < 1``. Here ``log2 m`` is clamped at 0: weights below 1 in magnitude
    need no positive exponents, only the exponent's sign, so ``e = 1`` for ``m <= 1``; for
    ``m >= 1`` this is the authors' formula.

    Example::

        exponent_bits(0.3), exponent_bits(1.0), exponent_bits(3.0)  # (1, 1, 3)
    """
    m = float(max_abs_weight)
    if not math.isfinite(m):
        raise ValueError(f"exponent_bits: max |E[w]| is {m}")
    if m <= 1:
        return 1
    return math.ceil(math.log2(math.log2(m) + 1) + 1)


def quantize(weight: torch.Tensor, frac_bits: int):
    """Rounds float32 ``weight`` to the grid ``2^-frac_bits``: the integers ``q`` and their width.

    ``q = floor(w 2^t + 1/2)`` (round half up, as the authors' code); the width is the number of
    two's-complement bits that hold every ``q`` of the tensor. :func:`dequantize` gives back the
    float32 weights, exactly ``q 2^-t``.

    Example::

        q, width = quantize(torch.tensor([0.3, -0.7]), 2)  # q = [1, -3], width 3
    """
    weight = weight.detach().float()
    if not torch.isfinite(weight).all():
        raise ValueError("quantize: the weights are not all finite")
    scaled = weight.double() * 2.0**frac_bits  # exact: a power-of-two scaling of float32
    q = torch.floor(scaled + 0.5).long()
    return q, fixed_point_width(q)


def fixed_point_width(q: torch.Tensor) -> int:
    """The two's-complement width holding every integer of ``q`` (at least 1 bit).

    Example::

        fixed_point_width(torch.tensor([3, -4]))  # 3: -4..3
    """
    if q.numel() == 0:
        return 1
    high = max(int(q.max()), 0)
    low = int(q.min())
    # B bits hold -2^(B-1) .. 2^(B-1) - 1
    return 1 + max(high.bit_length(), (-low - 1).bit_length() if low < 0 else 0)


def dequantize(q: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The float32 weights ``q 2^-frac_bits`` (exact for the ``q`` of :func:`quantize`).

    Example::

        dequantize(torch.tensor([1, -3]), 2)  # tensor([0.2500, -0.7500])
    """
    return (q.double() * 2.0**-frac_bits).float()


# ---------------------------------------------------------------------------------------------
# The chain of modules and its shapes


def _model_of(guide):
    model = getattr(guide, "model", None)
    if model is None or not callable(getattr(guide, "distributions", None)):
        raise ValueError(
            f"compress needs a pyro_bc.StructuredGuide (with .model and .distributions()); "
            f"got {type(guide).__name__}"
        )
    return model


def _chain(model):
    """The model's modules in run order as ``(name, module)``, nested Sequentials flattened."""
    if isinstance(model, BayesianLayer):
        return [(model.site(), model)]
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"compress thins chains of layers, but {type(model).__name__} is not an "
            f"nn.Sequential (e.g. pyro_bc.nn.BayesianNetwork); supported: {SUPPORTED}"
        )
    chain = []
    for name, module in model.named_children():
        if isinstance(module, nn.Sequential) and not isinstance(module, BayesianLayer):
            chain += [(f"{name}.{n}", m) for n, m in _chain(module)]
        else:
            chain.append((name, module))
    for name, module in chain:
        _check_supported(name, module)
    return chain


def _check_supported(name, module):
    if isinstance(module, BayesianConv2d):
        if module.groups != 1:
            raise ValueError(
                f"compress: layer {name!r} is a grouped convolution (groups={module.groups}); "
                "removing filters would make its groups unequal, which nn.Conv2d cannot hold. "
                "Only groups=1 convolutions can be thinned."
            )
    elif isinstance(module, BayesianLayer):
        if not isinstance(module, BayesianLinear):
            raise ValueError(
                f"compress: layer {name!r} is a {type(module).__name__}, which compress does "
                f"not know how to thin; supported: {SUPPORTED}"
            )
    elif isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(
                f"compress: {name!r} is Flatten(start_dim={module.start_dim}, "
                f"end_dim={module.end_dim}); only Flatten(1, -1) is supported"
            )
    elif isinstance(module, nn.MaxPool2d) and module.return_indices:
        raise ValueError(f"compress: {name!r} is MaxPool2d(return_indices=True); not supported")
    elif not isinstance(module, ELEMENTWISE + POOLING + DROPPED + (nn.Flatten,)):
        raise ValueError(
            f"compress: module {name!r} is a {type(module).__name__}, which compress cannot "
            f"carry through a thinned network; supported: {SUPPORTED}"
        )


def _input_shape(model, chain, input_shape):
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        first = next(m for _, m in chain if isinstance(m, BayesianLayer))
        if isinstance(first, BayesianConv2d):
            raise ValueError(
                f"compress: the model has no input_shape and its first Bayesian layer "
                f"{first.site()!r} is a convolution; pass input_shape=(channels, height, width)"
            )
        input_shape = (first.in_features,)
    return tuple(int(s) for s in input_shape)


def _trace_shapes(chain, input_shape):
    """The per-example input shape of every module, from a forward pass on meta tensors."""
    x = torch.empty(1, *input_shape, device="meta")
    shapes = []
    for name, module in chain:
        shapes.append(tuple(x.shape[1:]))
        try:
            if isinstance(module, BayesianLinear):
                x = F.linear(x, torch.empty(module.weight_shape, device="meta"))
            elif isinstance(module, BayesianConv2d):
                x = module._conv(x, torch.empty(module.weight_shape, device="meta"), None)
            else:
                x = module(x)
        except RuntimeError as e:
            raise ValueError(
                f"compress: module {name!r} cannot take an input of shape {shapes[-1]} "
                f"(from input_shape={input_shape}): {e}"
            ) from None
    shapes.append(tuple(x.shape[1:]))
    return shapes


# ---------------------------------------------------------------------------------------------
# Posterior summaries and masks


@dataclass
class _Summary:
    log_alpha: torch.Tensor
    weight_mean: torch.Tensor  # float64
    weight_var: torch.Tensor  # float64
    bias_mean: torch.Tensor | None


def _normal_of(posteriors, site):
    if site not in posteriors:
        raise ValueError(
            f"compress: the guide has no distribution for site {site!r}; was it built for "
            "this model (pyro_bc.StructuredGuide(model))?"
        )
    base = posteriors[site]
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if not isinstance(base, torch.distributions.Normal):
        raise ValueError(
            f"compress: site {site!r} has a {type(base).__name__} posterior; compress needs "
            "a Normal for weights and biases"
        )
    return base.loc.detach().double(), base.variance.detach().double()


def _summarise(layer, posteriors):
    name = layer.site()
    mean_z, var_z = layer.prior.scale_moments(name, layer.num_groups, posteriors)
    log_alpha = layer.prior.log_dropout_rate(name, layer.num_groups, posteriors).detach()
    if torch.isnan(log_alpha).any():
        bad = torch.isnan(log_alpha).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"compress: the pruning quantity of layer {name!r} is NaN for groups {bad}...; "
            "the guide's scale parameters are NaN or degenerate. Check the training run."
        )
    mu, sigma2 = _normal_of(posteriors, layer.site("weight"))
    broadcast = (1, -1) if layer.group_side == "input" else (-1,) + (1,) * (mu.dim() - 1)
    mean_z = mean_z.detach().double().reshape(broadcast)
    var_z = var_z.detach().double().reshape(broadcast)
    weight_mean = mean_z * mu
    weight_var = mean_z.pow(2) * sigma2 + var_z * (mu.pow(2) + sigma2)
    bias_mean = None
    if layer.has_bias:
        bias_mean, _ = _normal_of(posteriors, layer.site("bias"))
        if layer.group_side == "output":
            bias_mean = bias_mean * mean_z.flatten()
    return _Summary(log_alpha, weight_mean, weight_var, bias_mean)


def _resolve_thresholds(thresholds, log_alphas, separations):
    """``{layer: (threshold, how it was chosen)}`` from compress's ``thresholds`` argument."""
    names = list(log_alphas)
    if thresholds is None or isinstance(thresholds, (int, float, str)):
        thresholds = dict.fromkeys(names, thresholds)
    elif isinstance(thresholds, dict):
        unknown = set(thresholds) - set(names)
        if unknown:
            raise ValueError(
                f"compress: thresholds name layers the model does not have: {sorted(unknown)}; "
                f"its Bayesian layers are {names}"
            )
    else:
        raise ValueError(
            "compress: thresholds must be None, a number, 'auto' or a dict {layer: number or "
            f"'auto'}}; got {type(thresholds).__name__}"
        )
    return {
        name: _threshold(name, thresholds.get(name), log_alphas[name], separations[name])
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"compress: threshold of {name!r} must be a number, got {value!r}")
    return float(value), "given"


@dataclass
class _Plan:
    """The units a Bayesian layer keeps and the inputs a Gather in front of it selects."""

    in_keep: torch.Tensor
    out_keep: torch.Tensor
    below_threshold: int
    gather: torch.Tensor | None = None
    gather_from: int = 0


def _plan_masks(chain, shapes, summaries, thresholds):
    """Group masks, propagated along the chain (see the module docstring)."""
    plans = {}
    producer = owner = None  # the last Bayesian layer and, per unit of the flow, its source unit
    for (name, module), shape in zip(chain, shapes[:-1], strict=True):
        if isinstance(module, BayesianLayer):
            site = module.site()
            keep = summaries[site].log_alpha < thresholds[site][0]
            if isinstance(module, BayesianLinear):
                plan = _plan_dense(name, module, shape, keep, plans.get(producer), owner)
            else:
                plan = _plan_conv(name, module, shape, keep, plans.get(producer), owner)
            plans[site] = plan
            producer, owner = site, torch.arange(plan.out_keep.numel())
        elif isinstance(module, nn.Flatten) and owner is not None and len(shape) > 1:
            owner = owner.repeat_interleave(math.prod(shape[1:]))
    for check in (_check_inputs, _check_outputs):
        for name, plan in plans.items():
            check(name, plan)
    return plans


def _plan_dense(name, layer, shape, keep, before, owner):
    if len(shape) != 1:
        raise ValueError(
            f"compress: dense layer {name!r} gets inputs of shape {shape}; compress needs "
            "them flattened: put nn.Flatten() before it"
        )
    in_keep = keep.clone()
    available = torch.ones_like(in_keep)
    if before is not None:
        in_keep &= before.out_keep[owner]
        # A unit of the layer before that no kept input of this layer reads can go.
        used = torch.zeros_like(before.out_keep)
        used[owner[in_keep]] = True
        before.out_keep &= used
        available = before.out_keep[owner]
    plan = _Plan(in_keep, torch.ones(layer.weight_shape[0], dtype=torch.bool), int(keep.sum()))
    if not torch.equal(in_keep, available):
        # positions of the kept inputs among those the thinned network still delivers
        plan.gather = (available.long().cumsum(0) - 1)[in_keep]
        plan.gather_from = int(available.sum())
    return plan


def _plan_conv(name, layer, shape, keep, before, owner):
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise ValueError(
            f"compress: convolution {name!r} gets inputs of shape {shape}; it needs "
            f"(channels={layer.in_channels}, height, width)"
        )
    in_keep = torch.ones(layer.in_channels, dtype=torch.bool)
    if before is not None:
        in_keep = before.out_keep[owner].clone()
    return _Plan(in_keep, keep.clone(), int(keep.sum()))


def _check_inputs(name, plan):
    if not plan.in_keep.any():
        raise ValueError(
            f"compress: the thresholds remove every input of layer {name!r} (its own groups or "
            "the units of the layer before it), so the network would ignore its input; use a "
            "higher threshold for it or the layer before it"
        )


def _check_outputs(name, plan):
    if not plan.out_keep.any():
        raise ValueError(
            f"compress: no output of layer {name!r} is used by the next layer, whose inputs "
            "are all pruned; use a higher threshold for the next layer"
        )


# ---------------------------------------------------------------------------------------------
# compress


@torch.no_grad()
def compress(
    guide,
    thresholds=None,
    *,
    bits="auto",
    input_shape=None,
    test_loader=None,
    calibration=None,
) -> CompressedNetwork:
    """Compresses the posterior of ``guide`` into a thinned, quantized :class:`CompressedNetwork`.

    :param guide: a trained :class:`~pyro_bc.StructuredGuide`; its ``model`` must be a chain
        (``nn.Sequential``, e.g. :class:`~pyro_bc.nn.BayesianNetwork`) of Bayesian layers and
        ReLU / LeakyReLU / Tanh / MaxPool2d / AvgPool2d / Flatten / Identity / Dropout modules.
    :param thresholds: groups with ``log alpha >= threshold`` are pruned (``log alpha`` is the
        prior's ``log_dropout_rate``). A number for every layer, a dict ``{layer: number or
        "auto"}`` (missing layers get ``"auto"``), or ``"auto"`` (the default, also None):
        each layer's threshold is the valley between the two modes of its histogram of the
        pruning quantity (:func:`histogram_valley`), as the authors advise ("pick a value that
        separates the two modes"), and :data:`DEFAULT_THRESHOLD` ``= -3`` (the authors' value;
        for GNJ: the scale's posterior standard deviation is 22% of its mean) where the
        histogram has no two modes at least the prior's ``mode_separation`` apart, as early in
        training. A fixed -3 is not the default because after long training the kept mode
        drifts up to it and -3 cuts into it (seen on LeNet-300-100: 12.9% error at -3 against
        3.4% at the valley, on the shipped subset after 200 epochs).
    :param bits: ``"auto"``: PAPER.md's bit-width rule per layer (:func:`significand_bits`); an
        int ``t`` in 0..23: that many fraction bits for every layer; a dict ``{layer: int or
        "auto"}``; or None: no quantization, float32 posterior means (e.g. to compare with the
        posterior-mean network).
    :param input_shape: the shape of one example; default ``guide.model.input_shape``. Needed
        for the spatial sizes behind a Flatten and for the multiply-adds of convolutions.
    :param test_loader: optional ``(x, y)`` batches; the report then states the test error of
        the returned network (and of the dense posterior-mean network).
    :param calibration: optional ``(x, y)`` batches of *training* data. A pruned input is then
        replaced by its mean instead of by zero: the mean input of every Bayesian layer is
        measured on the dense posterior-mean network, and ``E[w_ji] * mean_i`` of each pruned
        input ``i`` is added to the bias of unit ``j`` (for a convolution, the channel's mean
        over examples and positions times the sum of the filter's taps, exact away from zero
        padding). Without it a pruned input that is constant but not zero, such as an MNIST
        border pixel scaled to -1, takes its weights' mean effect with it; the horseshoe, which
        shrinks such groups less than GNJ does, needs this. Layers without a bias are left as
        they are.
    :raises ValueError: for a model compress cannot thin (it names the module and lists what is
        supported), thresholds that remove a whole layer, or bad arguments.

    Example::

        compressed = pyro_bc.compress(guide, thresholds="auto", test_loader=test_loader)
        print(compressed.report)   # architecture 784-300-100 -> 278-98-13, rates, bits, error
        compressed.save("lenet300.bc")
    """
    model, chain, shape_in, shapes, summaries, chosen, plans = _analyse(
        guide, thresholds, input_shape
    )
    means = {} if calibration is None else _input_means(chain, summaries, calibration)
    kept = {site: _thin(summaries[site], plans[site], means.get(site)) for site in plans}
    frac_bits = _resolve_bits(bits, kept)
    quantized = [kept[site][0] for site, t in frac_bits.items() if t is not None]
    e = exponent_bits(max(w.abs().max().item() for w in quantized)) if quantized else None

    modules, formats, layer_reports = OrderedDict(), {}, []
    for index, (name, module) in enumerate(chain):
        key = name.replace(".", "_")
        if isinstance(module, DROPPED):
            continue
        if not isinstance(module, BayesianLayer):
            modules[key] = copy.deepcopy(module)
            continue
        site = module.site()
        plan, t = plans[site], frac_bits[site]
        if plan.gather is not None:
            modules[_unique(f"{key}_gather", modules)] = Gather(plan.gather, plan.gather_from)
        weight, var, bias = kept[site]
        thinned, width = _thinned_layer(site, module, weight, bias, t)
        modules[key], formats[key] = thinned, t
        thinned_shapes = (tuple(weight.shape), None if bias is None else bias.numel())
        layer_reports.append(
            _layer_report(
                module, plan, chosen[site], thinned_shapes, (t, e, width), shapes[index + 1]
            )
        )
    network = CompressedNetwork(modules, input_shape=shape_in, formats=formats)
    network.eval()
    network.report = _make_report(network, layer_reports, e, shape_in, model, guide, test_loader)
    network.report.calibration_examples = means.get(None)
    return network


def _analyse(guide, thresholds, input_shape):
    """Steps 1 and 2 of :func:`compress` (summaries, thresholds, masks), shared with
    :func:`group_masks` so that plots show exactly the masks compress applies."""
    model = _model_of(guide)
    chain = _chain(model)
    layers = [m for _, m in chain if isinstance(m, BayesianLayer)]
    if not layers:
        raise ValueError(f"compress: {type(model).__name__} has no pyro_bc Bayesian layers")
    shape_in = _input_shape(model, chain, input_shape)
    shapes = _trace_shapes(chain, shape_in)
    posteriors = guide.distributions()
    summaries = {layer.site(): _summarise(layer, posteriors) for layer in layers}
    chosen = _resolve_thresholds(
        thresholds,
        {k: s.log_alpha for k, s in summaries.items()},
        {layer.site(): layer.prior.mode_separation for layer in layers},
    )
    plans = _plan_masks(chain, shapes, summaries, chosen)
    return model, chain, shape_in, shapes, summaries, chosen, plans


@dataclass
class LayerMasks:
    """What :func:`compress` keeps of one Bayesian layer, and the posterior summaries behind it.

    Masks are boolean, ``True`` = kept, after propagation through the chain (a unit no later
    layer reads is removed even if its own group is kept). ``weight_mean`` and ``weight_var``
    are ``E[w]`` and ``Var[w]`` of the whole (unpruned) weight tensor, float64, shaped like the
    layer's weights: ``(out, in)`` for dense layers, ``(out, in, kh, kw)`` for convolutions.

    :ivar name: the layer's site prefix, e.g. ``"fc1"``.
    :ivar kind: ``"dense"`` (groups are the inputs) or ``"conv"`` (groups are the filters).
    :ivar log_alpha: the pruning quantity of every group (``prior.log_dropout_rate``).
    :ivar threshold: the threshold applied; a group is pruned when ``log_alpha >= threshold``.
    :ivar threshold_rule: ``"default"``, ``"given"``, ``"auto"`` or ``"auto: one mode, default"``.
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
    mode_separation: float = MIN_MODE_SEPARATION

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


@torch.no_grad()
def group_masks(guide, thresholds=None, *, input_shape=None) -> dict:
    """The masks :func:`compress` would apply, per Bayesian layer: ``{name: LayerMasks}``.

    Same arguments and same computation as :func:`compress` (``thresholds`` as there), without
    building the network: for plots and for inspecting a posterior before compressing it.

    Example::

        masks = group_masks(guide, thresholds="auto")
        {name: int(m.groups_kept.sum()) for name, m in masks.items()}  # {'fc1': 278, ...}
    """
    _, chain, _, _, summaries, chosen, plans = _analyse(guide, thresholds, input_shape)
    masks = {}
    for _, module in chain:
        if not isinstance(module, BayesianLayer):
            continue
        site = module.site()
        summary, plan, (threshold, rule) = summaries[site], plans[site], chosen[site]
        masks[site] = LayerMasks(
            name=site,
            kind="dense" if isinstance(module, BayesianLinear) else "conv",
            log_alpha=summary.log_alpha.clone(),
            threshold=threshold,
            threshold_rule=rule,
            below_threshold=summary.log_alpha < threshold,
            in_keep=plan.in_keep.clone(),
            out_keep=plan.out_keep.clone(),
            weight_mean=summary.weight_mean.clone(),
            weight_var=summary.weight_var.clone(),
            mode_separation=module.prior.mode_separation,
        )
    return masks


def _unique(name, taken):
    while name in taken:
        name += "_"
    return name


def _thin(summary, plan, input_mean=None):
    """Kept weight means (float32), their variances and the kept bias means (float32), with the
    mean contribution of the pruned inputs folded into the bias when ``input_mean`` is given."""
    rows, cols = plan.out_keep, plan.in_keep
    weight = summary.weight_mean[rows][:, cols].float()
    var = summary.weight_var[rows][:, cols]
    if summary.bias_mean is None:
        return weight, var, None
    bias = summary.bias_mean[rows]
    if input_mean is not None:
        dropped = summary.weight_mean[rows][:, ~cols]
        taps = dropped.flatten(2).sum(-1) if dropped.dim() > 2 else dropped
        bias = bias + taps @ input_mean[~cols]
    return weight, var, bias.float()


@torch.no_grad()
def _input_means(chain, summaries, loader):
    """The mean input of each Bayesian layer of the dense posterior-mean network over
    ``loader`` (per feature for dense layers, per channel for convolutions), keyed by site;
    under the key None, the number of examples."""
    steps = []  # (site of a Bayesian layer or None, the module that computes the next input)
    for _, module in chain:
        if isinstance(module, BayesianLayer):
            summary = summaries[module.site()]
            weight = summary.weight_mean.float()
            bias = None if summary.bias_mean is None else summary.bias_mean.float()
            steps.append(
                (module.site(), _thinned_layer(module.site(), module, weight, bias, None)[0])
            )
        elif not isinstance(module, DROPPED):
            steps.append((None, module))
    sums, seen = {}, 0
    for x, _ in loader:
        seen += len(x)
        for site, module in steps:
            if site is not None:
                total = x.double().sum(0) if x.dim() == 2 else x.double().mean((2, 3)).sum(0)
                sums[site] = sums.get(site, 0) + total
            x = module(x)
    if not seen:
        raise ValueError("compress: the calibration loader yielded no examples")
    return {site: total / seen for site, total in sums.items()} | {None: seen}


def _resolve_bits(bits, kept):
    names = list(kept)
    if bits is None or isinstance(bits, (int, str)):
        bits = dict.fromkeys(names, bits)
    elif isinstance(bits, dict):
        unknown = set(bits) - set(names)
        if unknown:
            raise ValueError(
                f"compress: bits name layers the model does not have: {sorted(unknown)}; its "
                f"Bayesian layers are {names}"
            )
        bits = {name: bits.get(name, "auto") for name in names}
    else:
        raise ValueError(f"compress: bits must be 'auto', an int, a dict or None; got {bits!r}")
    resolved = {}
    for name, value in bits.items():
        if value == "auto":
            resolved[name] = significand_bits(kept[name][1])
        elif value is None:
            resolved[name] = None
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_FRACTION_BITS:
                raise ValueError(
                    f"compress: bits of {name!r} is {value}; use 0..{MAX_FRACTION_BITS} "
                    "fraction bits, 'auto' or None (float32)"
                )
            resolved[name] = value
        else:
            raise ValueError(f"compress: bits of {name!r} must be 'auto', an int or None")
    return resolved


def _thinned_layer(site, layer, weight, bias, t):
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise ValueError(
            f"compress: the posterior means of layer {site!r} are not all finite; check the "
            "training run"
        )
    width = 32
    if t is not None:
        q, width = quantize(weight, t)
        if width > MAX_WIDTH:
            raise ValueError(
                f"compress: layer {site!r} has weights up to {weight.abs().max().item():.3g}, "
                f"which need {width} > {MAX_WIDTH} bits with {t} fraction bits; use fewer bits "
                "for it (bits={...})"
            )
        weight = dequantize(q, t)
    out_features, in_features = weight.shape[:2]
    if isinstance(layer, BayesianLinear):
        thinned = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias is not None)
    else:
        thinned = nn.utils.skip_init(
            nn.Conv2d,
            in_features,
            out_features,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
        )
    thinned.weight.copy_(weight)
    if bias is not None:
        thinned.bias.copy_(bias)
    return thinned, width


def _layer_report(layer, plan, threshold, thinned_shapes, bits, out_shape):
    dense = isinstance(layer, BayesianLinear)
    kept_shape, biases_kept = thinned_shapes
    t, e, width = bits
    weights_kept = math.prod(kept_shape)
    # a convolution's weights are used once per output position
    spatial = 1 if dense else math.prod(out_shape[1:])
    total = math.prod(layer.weight_shape)
    return LayerReport(
        name=layer.site(),
        kind="dense" if dense else "conv",
        groups=layer.num_groups,
        groups_below_threshold=plan.below_threshold,
        groups_kept=int((plan.in_keep if dense else plan.out_keep).sum()),
        threshold=threshold[0],
        threshold_rule=threshold[1],
        weights=total,
        weights_kept=weights_kept,
        biases=layer.weight_shape[0] if layer.has_bias else 0,
        biases_kept=biases_kept or 0,
        kept_shape=kept_shape,
        frac_bits=t,
        paper_bits=32 if t is None else 1 + e + t,
        file_bits=width,
        macs=total * spatial,
        macs_kept=weights_kept * spatial,
    )


def _make_report(network, layer_reports, e, input_shape, model, guide, test_loader):
    from .codec import _encode

    _, layout = _encode(network)
    report = CompressionReport(
        layers=layer_reports,
        exponent_bits=e,
        input_shape=input_shape,
        file_bytes=sum(layout.values()),
        file_layout=layout,
    )
    if test_loader is not None:
        result = network.evaluate(test_loader)
        report.test_error, report.test_examples = result["error"], result["n"]
        report.dense_test_error = _dense_error(model, guide, test_loader)
    return report


def _dense_error(model, guide, loader):
    from .infer import predict_logits

    errors = seen = 0
    for x, y in loader:
        errors += (predict_logits(model, guide, x).argmax(-1) != y).sum().item()
        seen += len(y)
    return errors / seen
