"""Plot helpers for quantities measured layer by layer or swept over a hyperparameter.

The chapters compare the same measurement across normalization kinds; these helpers keep one
colour per kind across every figure of a chapter and put labels, units and legends where a reader
expects them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "FIGURE_DPI",
    "NORM_COLORS",
    "NORM_LABELS",
    "PAGE_WIDTH",
    "page_figure",
    "plot_per_layer",
    "plot_sweep",
]

# Figures are drawn for the page they are shown on. The site's text column is 784 px wide on a
# desktop screen, and the page shows a PNG at the size it was drawn whenever it fits, shrinking it
# only when it is wider. A figure PAGE_WIDTH inches wide at FIGURE_DPI pixels per inch is 760 px,
# so it is shown 1:1 and matplotlib's 10 pt labels stay 14 px tall on screen (a 9 px floor is
# 6.5 pt). Panels that would not fit side by side at that width go in rows instead of shrinking.
FIGURE_DPI = 100
PAGE_WIDTH = 7.6  # inches

# One colour per normalization kind (the names of normlib.book.models.NORMS), so "batch" is the
# same colour in every figure; kinds not listed fall back to matplotlib's cycle.
NORM_COLORS = {
    "none": "tab:red",
    "batch": "tab:blue",
    "layer": "tab:green",
    "layer2d": "tab:olive",
    "rms": "tab:purple",
    "group": "tab:orange",
    "instance": "tab:brown",
}

NORM_LABELS = {
    "none": "no normalization",
    "batch": "BatchNorm",
    "layer": "LayerNorm",
    "layer2d": "LayerNorm over C",
    "rms": "RMSNorm",
    "group": "GroupNorm",
    "instance": "InstanceNorm",
}


def page_figure(
    panels: int = 1,
    *,
    per_row: int = 2,
    panel_height: float = 3.2,
    sharex: bool = False,
    sharey: bool = False,
):
    """A figure as wide as the text column holding ``panels`` axes, at most ``per_row`` side by
    side and the rest in further rows; returns ``(fig, axes)`` with ``axes`` a list of
    ``panels`` axes in reading order (left to right, then down), or the one Axes itself when
    ``panels`` is 1, as ``plt.subplots`` does.

    ``panel_height`` is the height of one row in inches. The layout is matplotlib's constrained
    layout, so titles, labels and legends get the room they need without ``tight_layout``.
    """
    import matplotlib.pyplot as plt

    if panels < 1 or per_row < 1:
        raise ValueError(f"panels and per_row must be at least 1, got {panels} and {per_row}")
    cols = min(panels, per_row)
    rows = math.ceil(panels / cols)
    fig, grid = plt.subplots(
        rows,
        cols,
        figsize=(PAGE_WIDTH, panel_height * rows),
        dpi=FIGURE_DPI,
        layout="constrained",
        squeeze=False,
        sharex=sharex,
        sharey=sharey,
    )
    axes = list(grid.flat)
    for unused in axes[panels:]:
        unused.remove()
    return fig, axes[0] if panels == 1 else axes[:panels]


def _style(key: str) -> dict:
    """Colour and label for a curve keyed by a norm kind, or by ``"<kind>: <anything>"``."""
    kind, separator, detail = key.partition(":")
    kind = kind.strip()
    if kind not in NORM_LABELS:
        return {"label": key}
    return {"label": NORM_LABELS[kind] + separator + detail, "color": NORM_COLORS[kind]}


def plot_per_layer(
    ax,
    values: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str,
    log: bool = True,
    first_layer: int = 1,
    styles: Mapping[str, dict] | None = None,
):
    """One line per key of ``values`` (a norm kind, optionally followed by ``": detail"``) against
    the layer index, counted from ``first_layer`` at the input side. Returns ``ax``.

    ``log=True`` uses a logarithmic y axis, the only scale on which a vanishing gradient and a
    healthy one fit in one picture. ``styles[key]`` (matplotlib line keywords such as
    ``{"linestyle": "--"}``) overrides the default colour and label of one curve.
    """
    if not values:
        raise ValueError("values must hold at least one curve, got an empty mapping")
    for key, curve in values.items():
        curve = np.asarray(curve, dtype=float)
        if curve.ndim != 1:
            raise ValueError(f"values[{key!r}] must be one number per layer, got shape {curve.shape}")
        layers = np.arange(first_layer, first_layer + len(curve))
        style = {**_style(key), **(styles or {}).get(key, {})}
        ax.plot(layers, curve, marker="o", markersize=3, **style)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer (1 = next to the input)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return ax


def plot_sweep(
    ax,
    x: Sequence[float],
    values: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = True,
    failed_y: float | None = None,
    styles: Mapping[str, dict] | None = None,
):
    """One line per key of ``values`` against a swept hyperparameter ``x``; returns ``ax``.

    A NaN in a curve marks a failed (diverged) run: it is drawn as an ``x`` marker at height
    ``failed_y`` when given, so failures stay visible instead of leaving a silent gap; the markers
    of successive curves are staggered slightly downwards so that failures of two curves at the
    same ``x`` do not hide each other. ``styles`` works as in :func:`plot_per_layer`.
    """
    x = np.asarray(x, dtype=float)
    stagger = 0.02 * (ax.get_ylim()[1] - ax.get_ylim()[0]) if failed_y is not None else 0.0
    for index, (key, curve) in enumerate(values.items()):
        curve = np.asarray(curve, dtype=float)
        if curve.shape != x.shape:
            raise ValueError(f"values[{key!r}] must have one entry per x ({x.shape}), got {curve.shape}")
        style = {**_style(key), **(styles or {}).get(key, {})}
        (line,) = ax.plot(x, curve, marker="o", **style)
        failed = np.isnan(curve)
        if failed_y is not None and failed.any():
            ax.plot(x[failed], np.full(failed.sum(), failed_y - index * stagger), linestyle="none",
                    marker="x", markersize=9, markeredgewidth=2, color=line.get_color())
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ax
