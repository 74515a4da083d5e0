"""The experiments of the chapter on training without normalization: a residual CNN whose norm is a
choice (BatchNorm, none, SkipInit, NF), AGC attached to a model, the input/output pairs of trained
LayerNorms, and DyT's alpha in the tiny Transformer.

The residual CNN is a pre-activation ResNet (He et al., 2016) cut down to 8x8 digits: a stem
convolution, ``blocks`` residual blocks that keep the 8x8 resolution and the width, then a 2x2
average pool and a linear head on the 4x4 maps.
Its ``norm`` decides what each block's residual branch looks like::

    "batch"     x + conv(relu(bn(conv(relu(bn(x))))))
    "none"      x + conv(relu(conv(relu(x))))                  (no normalization at all)
    "skipinit"  x + g * conv(relu(conv(relu(x))))             g a learnable scalar, 0 at start
    "nf"        x + a * wsconv(relu(wsconv(relu(x / b))))     Brock et al. (2021a)

In the NF network the convolutions are :class:`normlib.ScaledWSConv2d` with the ReLU gain, b is the
expected standard deviation of the residual stream at the block's input (b^2 grows by a^2 per
block) and a = 0.2; train it with :func:`attach_agc` (Brock et al., 2021b).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

import normlib
from normlib.norm_free import RELU_GAMMA, ScaledWSConv2d, SkipInit, adaptive_grad_clip

__all__ = [
    "CNN_NORMS",
    "ResidualCNN",
    "attach_agc",
    "layer_norm_io",
    "set_dyt_alpha",
    "tail_to_centre_slope",
]

CNN_NORMS = ("batch", "none", "skipinit", "nf")
NF_ALPHA = 0.2  # the residual branch's scale in NF-ResNets (Brock et al., 2021a)


class ResidualBlock(nn.Module):
    """One pre-activation residual block at constant width; see the module docstring for ``norm``."""

    def __init__(self, width: int, norm: str, expected_std: float = 1.0):
        super().__init__()
        self.norm = norm
        self.expected_std = expected_std  # b: used by "nf" only
        if norm == "nf":
            self.conv_1 = ScaledWSConv2d(width, width, 3, padding=1, gamma=RELU_GAMMA)
            self.conv_2 = ScaledWSConv2d(width, width, 3, padding=1, gamma=RELU_GAMMA)
        else:
            self.conv_1 = nn.Conv2d(width, width, 3, padding=1, bias=norm != "batch")
            self.conv_2 = nn.Conv2d(width, width, 3, padding=1)
        batch = norm == "batch"
        self.norm_1 = normlib.BatchNorm2d(width) if batch else nn.Identity()
        self.norm_2 = normlib.BatchNorm2d(width) if batch else nn.Identity()
        self.skip_gain = SkipInit() if norm == "skipinit" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        h = x / self.expected_std if self.norm == "nf" else self.norm_1(x)
        h = self.conv_1(torch.relu(h))
        h = self.conv_2(torch.relu(self.norm_2(h)))
        if self.norm == "nf":
            h = NF_ALPHA * h
        return x + self.skip_gain(h)


class ResidualCNN(nn.Module):
    """A residual CNN for 8x8 digits, (N, 1, 8, 8) -> (N, 10) logits, whose norm is one of :data:`CNN_NORMS`."""

    def __init__(self, norm: str = "batch", width: int = 16, blocks: int = 4, num_classes: int = 10):
        super().__init__()
        if norm not in CNN_NORMS:
            raise ValueError(f"norm must be one of {CNN_NORMS}, got {norm!r}")
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.norm = norm
        stem = ScaledWSConv2d if norm == "nf" else nn.Conv2d
        self.stem = stem(1, width, 3, padding=1)  # (N, width, 8, 8)
        stds = [math.sqrt(1.0 + i * NF_ALPHA**2) for i in range(blocks)]  # b of each NF block
        self.blocks = nn.Sequential(*(ResidualBlock(width, norm, std) for std in stds))
        self.norm_f = normlib.BatchNorm2d(width) if norm == "batch" else nn.Identity()
        # pooled to 4x4, not to one value per channel: a 3x3 stem alone, which is what SkipInit's
        # network is at initialization, then still feeds the head the digit's layout
        self.head = nn.Linear(width * 16, num_classes)
        if norm == "nf":
            nn.init.zeros_(self.head.weight)  # as in the NF-ResNet code: the head starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))  # (N, width, 8, 8)
        h = nn.functional.avg_pool2d(torch.relu(self.norm_f(h)), 2)  # (N, width, 4, 4)
        return self.head(h.flatten(1))  # (N, num_classes)


def attach_agc(model: nn.Module, clipping: float = 0.01, *, exclude: Iterable[nn.Parameter] = ()) -> list:
    """Clip every parameter's gradient unit-wise (:func:`normlib.adaptive_grad_clip`) as soon as
    backward has accumulated it, i.e. before ``optimizer.step()``, whatever loop trains ``model``.

    ``exclude``: parameters left unclipped (Brock et al. leave the final linear layer alone).
    Returns the hook handles (call ``.remove()`` on each to detach). Meant for loops with one
    backward per step: with gradient accumulation, each backward would be clipped on its own.
    """
    excluded = {id(p) for p in exclude}
    handles = []
    for param in model.parameters():
        if id(param) in excluded or not param.requires_grad:
            continue
        handles.append(param.register_post_accumulate_grad_hook(lambda p: adaptive_grad_clip(p, clipping)))
    return handles


@torch.no_grad()
def layer_norm_io(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """For every :class:`normlib.LayerNorm` of ``model``: (name, input, normalized output) on ``inputs``.

    The output is x_hat = (x - mean) / sqrt(var + eps), before gamma and beta, as float64 arrays of
    shape (tokens, channels): what Zhu et al. (2025) plot against the input.
    """
    records: list[tuple[str, np.ndarray, np.ndarray]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, normlib.LayerNorm):

            def hook(module, args, _output, name=name):
                x = args[0].double()
                x_hat = normlib.layer_norm(x, module.normalized_shape, None, None, module.eps)
                width = x.shape[-1]
                records.append((name, x.reshape(-1, width).numpy(), x_hat.reshape(-1, width).numpy()))

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return records


def tail_to_centre_slope(x: np.ndarray, y: np.ndarray, quantile: float = 0.95) -> float:
    """How S-shaped the cloud of points (x, y) is: the least-squares slope of y on x over the
    points with |x| beyond the ``quantile`` of |x|, divided by the slope over the points with |x|
    below the median. 1 for a straight line, < 1 where the curve flattens at the ends as tanh does.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 8:
        raise ValueError(f"x and y must hold the same number (>= 8) of points, got {x.size} and {y.size}")
    if not 0.5 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0.5, 1), got {quantile}")
    size = np.abs(x)

    def slope(mask: np.ndarray) -> float:
        xs, ys = x[mask], y[mask]
        xs, ys = xs - xs.mean(), ys - ys.mean()
        return float((xs * ys).sum() / (xs * xs).sum())

    # the tails on both sides together: their slope is that of the line joining the two ends
    return slope(size >= np.quantile(size, quantile)) / slope(size <= np.median(size))


def set_dyt_alpha(model: nn.Module, alpha_init: float) -> nn.Module:
    """Re-initialize the alpha of every :class:`normlib.DyT` in ``model`` to ``alpha_init``; returns
    ``model``. Raises if it has none (a typo in the norm's name would otherwise pass silently)."""
    found = [module for module in model.modules() if isinstance(module, normlib.DyT)]
    if not found:
        raise ValueError("model has no normlib.DyT layer whose alpha could be set")
    for module in found:
        module.alpha_init = float(alpha_init)
        nn.init.constant_(module.alpha, alpha_init)
    return model
