"""Small models whose normalization layer is a parameter, so an experiment can swap it.

``norm_layer("batch", 16, dims=2)`` is how every chapter asks for a norm; the names are the ones the
book uses. For images (``dims=2``, NCHW maps) "layer" means what Wu & He (2018) call LayerNorm in
their GroupNorm paper, statistics over (C, H, W) of each sample, i.e. ``GroupNorm(1, C)``; the
ConvNeXt variant that normalizes over C alone at each pixel is "layer2d".
"""

from __future__ import annotations

from torch import nn

import normlib

NORMS = ("none", "batch", "layer", "layer2d", "rms", "group", "instance")


def norm_layer(kind: str, num_features: int, *, dims: int = 2, groups: int = 4) -> nn.Module:
    """A normalization layer for ``num_features`` channels (dims=2: NCHW) or features (dims=0: NF).

    ``kind`` is one of :data:`NORMS`. Affine parameters are on for every kind, so kinds differ only
    in which elements share statistics.
    """
    if kind not in NORMS:
        raise ValueError(f"kind must be one of {NORMS}, got {kind!r}")
    if dims not in (0, 2):
        raise ValueError(f"dims must be 0 (features, shape (N, F)) or 2 (images, NCHW), got {dims}")
    if kind == "none":
        return nn.Identity()
    if dims == 0:
        if kind == "batch":
            return normlib.BatchNorm1d(num_features)
        if kind in ("layer", "layer2d"):
            return normlib.LayerNorm(num_features)
        if kind == "rms":
            return normlib.RMSNorm(num_features)
        raise ValueError(f"kind={kind!r} needs spatial positions; use dims=2 for images")
    if kind == "batch":
        return normlib.BatchNorm2d(num_features)
    if kind == "layer":
        return normlib.GroupNorm(1, num_features)
    if kind == "layer2d":
        return normlib.LayerNorm2d(num_features)
    if kind == "group":
        if num_features % groups != 0:
            raise ValueError(f"groups={groups} must divide num_features={num_features}")
        return normlib.GroupNorm(groups, num_features)
    if kind == "instance":
        return normlib.InstanceNorm2d(num_features, affine=True)
    raise ValueError(f"kind={kind!r} has no image form; choose one of {NORMS}")


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for 8x8 digits: conv -> norm -> ReLU, twice.

    The norm sits between the convolution and the non-linearity, where Ioffe & Szegedy (2015) put
    it; the convolutions have no bias when a norm with a shift follows (the shift makes it redundant).
    """

    def __init__(self, norm: str = "batch", width: int = 16, num_classes: int = 10, groups: int = 4):
        super().__init__()
        bias = norm == "none"
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=bias),  # (N, width, 8, 8)
            norm_layer(norm, width, groups=groups),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, width, 4, 4)
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=bias),  # (N, 2*width, 4, 4)
            norm_layer(norm, 2 * width, groups=groups),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # (N, 2*width, 1, 1)
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))  # (N, num_classes)


class DeepMLP(nn.Module):
    """``depth`` blocks of Linear -> norm -> ReLU on flat inputs: deep enough that, without a norm,
    activations and gradients drift layer by layer (chapter 1 measures it)."""

    def __init__(self, in_features: int = 64, width: int = 64, depth: int = 20, num_classes: int = 10,
                 norm: str = "none"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers = []
        for i in range(depth):
            layers += [
                nn.Linear(in_features if i == 0 else width, width),
                norm_layer(norm, width, dims=0),
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(x))  # (N, num_classes)
