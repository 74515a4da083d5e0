"""Fused LayerNorm in Triton: the entry points of ``layer_norm`` and ``add_layer_norm``.

The kernels are :mod:`normlib.kernels.row_norm`'s, run with ``IS_RMS=False``: the row's mean is
subtracted (with the shifted, merged statistics of Chan et al., 1983), a bias may be added, and
the backward has LayerNorm's second row sum ``c2``. This file registers them with ``torch.library``
as custom ops, with a fake (shape-only) implementation and an autograd formula, so they run in
eager mode and inside ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from normlib._autograd import layer_norm_composite
from normlib.kernels import row_norm

__all__ = ["layer_norm_triton", "add_layer_norm_triton"]


@torch.library.custom_op("normlib::triton_layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h is empty without a residual."""
    return row_norm._forward(x, residual, weight, bias, n_cols, eps, is_rms=False)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, n_cols, eps):
    return row_norm.fake_forward(x, residual, n_cols, n_stats=2)  # mean and rstd


@torch.library.custom_op("normlib::triton_layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    n_cols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); dw and db are empty for an absent weight or bias."""
    dx, dw, db = row_norm._backward(dy, dh, x, weight, bias, mean, rstd, n_cols)
    return (dx, *row_norm.grads_or_empty(x, dw, db))


@_layer_norm_bwd_op.register_fake
def _(dy, dh, x, weight, bias, mean, rstd, n_cols):
    return row_norm.fake_backward(x, weight, bias)


# So that torch.compile can keep the op in its graph, forward and backward.
row_norm.register_autograd(_layer_norm_fwd_op, _layer_norm_bwd_op, layer_norm_composite)


# Entry points named in normlib.backends.IMPLEMENTATIONS, which says which inputs they take (the
# public op has checked the arguments).


def layer_norm_triton(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims with the fused Triton kernels."""
    y, _h, _mean, _rstd = _layer_norm_fwd_op(input, None, weight, bias, math.prod(normalized_shape), float(eps))
    return y


def add_layer_norm_triton(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(input + residual), input + residual) in one pass over memory."""
    y, h, _mean, _rstd = _layer_norm_fwd_op(
        input, residual, weight, bias, math.prod(normalized_shape), float(eps)
    )
    return y, h
