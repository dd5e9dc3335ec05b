"""The fixed-point number format of compressed layers.

A layer with ``t`` fraction bits stores its weights as integers ``q`` with ``w = q 2^-t``, in two's
complement at the smallest width ``B`` that holds them (1 sign bit, the integer bits the largest
weight needs, ``t`` fraction bits). Every ``q 2^-t`` is exactly a float32, so the network that
computes with these weights, the file that stores them and the report that counts them agree.
See ``docs/method.md#fixed-point-storage``.

Example::

    q, width = quantize(torch.tensor([0.3, -0.7]), 2)  # q = [1, -3], width 3
    dequantize(q, 2)                                    # tensor([ 0.2500, -0.7500])
"""

from __future__ import annotations

import torch

#: The largest number of fraction bits a layer may have (float32's significand).
MAX_FRACTION_BITS = 23
#: The widest fixed-point integer a layer may need.
MAX_WIDTH = 32


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


def on_grid(weight: torch.Tensor, frac_bits: int) -> torch.Tensor | None:
    """The integers ``q`` with ``weight == q 2^-frac_bits`` exactly, or None if it is off the grid.

    Example::

        on_grid(torch.tensor([0.25, -0.75]), 2)  # tensor([ 1, -3])
        on_grid(torch.tensor([0.3]), 2)          # None
    """
    weight = weight.detach().float()
    if not torch.isfinite(weight).all():
        return None
    scaled = weight.double() * 2.0**frac_bits
    q = scaled.round()
    return q.long() if torch.equal(q, scaled) else None
