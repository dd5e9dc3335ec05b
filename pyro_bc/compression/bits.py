"""Bit widths from posterior variances: the paper's rule (``docs/method.md#bit-widths``).

Per weight, the number of ``t`` in 1..23 with ``2 Var[w] < 2^-t`` (a weight whose posterior is
wide deserves few bits); per layer, the ceiling of the mean over its kept weights. One global
exponent width ``e`` completes the paper's accounting of ``1 + e + t_l`` bits per weight.
"""

from __future__ import annotations

import math

import torch

from ..checks import is_integer
from ..fixed_point import MAX_FRACTION_BITS
from .arguments import per_layer


def weight_bits(weight_var: torch.Tensor) -> torch.Tensor:
    """Per weight, the number of ``t`` in 1..23 with ``2 Var[w] < 2^-t``: the bits it deserves.

    The per-weight half of :func:`significand_bits`; same shape as ``weight_var``, int64.

    Example::

        weight_bits(torch.tensor([1e-3, 1e-5, 0.3]))  # tensor([ 8, 15,  0])
    """
    two_var = 2 * weight_var.detach().double()
    return sum((two_var < 2.0**-t).long() for t in range(1, MAX_FRACTION_BITS + 1))


def significand_bits(weight_var: torch.Tensor) -> int:
    """The fraction bits of a layer from the posterior variances of its kept weights: the
    ceiling of the mean of :func:`weight_bits`.

    Example::

        significand_bits(torch.tensor([1e-3, 1e-5]))  # per weight 8 and 15 -> ceil(11.5) = 12
    """
    if weight_var.numel() == 0:
        raise ValueError("significand_bits: the layer has no kept weights")
    counts = weight_bits(weight_var).flatten()
    total, n = int(counts.sum()), counts.numel()
    return -(-total // n)  # exact integer ceiling of the mean


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


def by_rule(bits, site: str) -> bool:
    """Whether compress's ``bits`` argument leaves ``site``'s width to the paper's rule.

    Example::

        by_rule({"fc1": 4}, "fc2")  # True: layers not named are "auto"
    """
    return bits == "auto" or (isinstance(bits, dict) and bits.get(site, "auto") == "auto")


def resolve_bits(bits, kept_vars: dict) -> dict:
    """``{layer: t or None}`` from compress's ``bits`` argument and each layer's kept weight
    variances: ``"auto"`` applies :func:`significand_bits`, an int is taken as given, None keeps
    the layer in float32.

    Example::

        resolve_bits({"fc1": 4}, {"fc1": var1, "fc2": var2})  # {'fc1': 4, 'fc2': 9}
    """
    bits = per_layer(bits, list(kept_vars), "bits", (int, str), "auto")
    resolved = {}
    for name, value in bits.items():
        if value == "auto":
            resolved[name] = significand_bits(kept_vars[name])
        elif value is None:
            resolved[name] = None
        elif is_integer(value):
            if not 0 <= value <= MAX_FRACTION_BITS:
                raise ValueError(
                    f"compress: bits of {name!r} is {value}; use 0..{MAX_FRACTION_BITS} "
                    "fraction bits, 'auto' or None (float32)"
                )
            resolved[name] = int(value)
        else:
            raise ValueError(f"compress: bits of {name!r} must be 'auto', an int or None")
    return resolved
