"""Which elements of an activation tensor share one mean and one variance, for each norm, drawn.

The picture is the one Wu & He (2018, Figure 2) use to tell the norms apart: the activations of a
convolutional layer as a box with axes N (samples), C (channels) and H*W (spatial positions,
flattened to one axis). The elements coloured in are normalized together with one pair of
statistics; every other same-sized block of the box gets its own pair. Chapter 3 draws BatchNorm,
both LayerNorms, InstanceNorm and GroupNorm side by side; chapter 6 reuses the figure.

The kinds are named as in :data:`normlib.book.models.NORMS`: "layer" is LayerNorm over (C, H, W) of
each sample (``GroupNorm(1, C)``), "layer2d" is the ConvNeXt LayerNorm over C alone at each position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KINDS = ("batch", "layer", "layer2d", "instance", "group")

TITLES = {
    "batch": "BatchNorm",
    "layer": "LayerNorm (C, H, W)",
    "layer2d": "LayerNorm over C\n(ConvNeXt)",
    "instance": "InstanceNorm",
    "group": "GroupNorm",
}

# Which axes of (N, C, HW) one set of statistics spans; the others index separate sets.
_REDUCED_AXES = {
    "batch": "N, H*W",
    "layer": "C, H*W",
    "layer2d": "C",
    "instance": "H*W",
    "group": "C/G, H*W",
}


def shared_statistics_mask(kind: str, n: int, c: int, hw: int, *, groups: int = 2) -> np.ndarray:
    """Boolean (n, c, hw) array: True where an element shares its statistics with element (0, 0, 0).

    This is the coloured block of the figure, and also a statement a test can check against what
    the norms compute: e.g. for "batch" it covers every sample and position of channel 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("n", n), ("c", c), ("hw", hw)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kind == "group" and (groups < 1 or c % groups != 0):
        raise ValueError(f"groups must be a positive divisor of c={c}, got {groups}")
    mask = np.zeros((n, c, hw), dtype=bool)
    if kind == "batch":
        mask[:, 0, :] = True
    elif kind == "layer":
        mask[0, :, :] = True
    elif kind == "layer2d":
        mask[0, :, 0] = True
    elif kind == "instance":
        mask[0, 0, :] = True
    else:  # group: the first c // groups channels of sample 0
        mask[0, : c // groups, :] = True
    return mask


def plot_norm_axes(
    kinds: Sequence[str] = ("batch", "layer", "instance", "group"),
    *,
    n: int = 4,
    c: int = 6,
    hw: int = 5,
    groups: int = 2,
    color: str = "tab:blue",
    fig: Figure | None = None,
) -> Figure:
    """Draw one (N, C, H*W) box per norm in ``kinds``, with one set of shared statistics coloured.

    Returns the matplotlib Figure (a new one unless ``fig`` is given). ``n``, ``c`` and ``hw`` are
    the box's size in cells, kept small so the cells stay visible; ``groups`` is GroupNorm's G.
    """
    import matplotlib.pyplot as plt  # imported here: only the book draws

    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one norm")
    masks = [shared_statistics_mask(kind, n, c, hw, groups=groups) for kind in kinds]
    if fig is None:
        fig = plt.figure(figsize=(3.2 * len(kinds), 3.6))
    for i, (kind, mask) in enumerate(zip(kinds, masks)):
        ax = fig.add_subplot(1, len(kinds), i + 1, projection="3d")
        _draw_box(ax, mask, color)
        title = TITLES[kind] + (f" (G={groups})" if kind == "group" else "")
        ax.set_title(f"{title}\nstatistics over {_REDUCED_AXES[kind]}", fontsize=10)
    return fig


def _draw_box(ax: Axes, mask: np.ndarray, color: str) -> None:
    """One box of cells: the plot's x axis is N, its depth C and its height H*W (Wu & He's layout)."""
    # voxels index (x, y, z) = (N, C, HW). Sample 0 is put on the right face and position 0 on the
    # top face, the two faces the view angle shows, so every kind's coloured block is visible.
    mask = mask[::-1, :, ::-1]
    filled = np.ones_like(mask)
    facecolors = np.where(mask, color, "#f2f2f2")
    ax.voxels(filled, facecolors=facecolors, edgecolor="#555555", linewidth=0.3)
    n, c, hw = mask.shape
    ax.set_box_aspect((n, c, hw))
    ax.set_xlabel("N")
    ax.set_ylabel("C")
    ax.set_zlabel("H, W")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])
    ax.view_init(elev=20, azim=-60)
