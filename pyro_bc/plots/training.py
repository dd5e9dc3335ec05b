"""How a run went: training curves, and test error against compression rate."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .figures import (
    leading,
    save,
)


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
    save(fig, path)
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
        markers = (
            (paper, "paper", {"marker": "*", "color": "tab:red"}),
            (
                chosen,
                "chosen (validation)",
                {"marker": "o", "markerfacecolor": "none", "markeredgecolor": "black"},
            ),
        )
        for point, label, style in markers:
            if point is not None and point.get(key) is not None:
                ax.plot(
                    [point[key]],
                    [100 * point["test_error"]],
                    markersize=14,
                    linestyle="none",
                    label=label,
                    **style,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            # plain numbers (2, 5, 10) read better than 10^x on axes of rates and percentages
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(
                FuncFormatter(lambda v, _: f"{v:g}" if leading(v) in (2, 5) else "")
            )
        ax.set_xlabel(f"compression rate {name} (x)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test error (%)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    save(fig, path)
    return fig
