"""What every figure shares: building without pyplot, atomic saving, panels, colours."""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from ..files import write_atomically

#: colour of pruned rows, columns and filters, drawn over the weights
PRUNED_RGBA = (0.82, 0.82, 0.82, 0.93)
KEPT_COLOR = "tab:blue"
PRUNED_COLOR = "tab:red"
#: the label of the image that marks pruned weights (tests and users can find it by label)
PRUNED_LABEL = "pruned"


def save(fig: Figure, path, dpi: int = 120) -> None:
    """Saves ``fig`` atomically (see :func:`pyro_bc.files.write_atomically`)."""
    if path is None:
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:].lower() or "png", dpi=dpi)
    write_atomically(path, buffer.getvalue())


def panels(count):
    """A figure with one panel per layer, three to a row; the spare panels hidden."""
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def leading(value: float) -> int:
    """The leading digit of a positive number (2 for 0.2, 20 and 200)."""
    return int(round(value / 10 ** math.floor(math.log10(value)), 6))
