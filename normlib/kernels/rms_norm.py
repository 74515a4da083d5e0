"""Fused RMSNorm in Triton: the entry points of ``rms_norm`` and ``add_rms_norm``.

The kernels are :mod:`normlib.kernels.row_norm`'s, run with ``IS_RMS=True``: no mean is subtracted
(so no shift is needed: the mean square has no cancellation), no bias, and the backward has one row
sum ``c1`` instead of LayerNorm's two. Registered below as ``torch.library`` custom ops with fake
(shape-only) implementations and an autograd formula, they run in eager mode and inside
``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from normlib._autograd import rms_norm_composite
from normlib.kernels import row_norm

__all__ = ["rms_norm_triton", "add_rms_norm_triton"]


@torch.library.custom_op("normlib::triton_rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], n_cols: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd); h is empty without a residual."""
    y, h, _no_mean, rstd = row_norm._forward(x, residual, weight, None, n_cols, eps, is_rms=True)
    return y, h, rstd


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, n_cols, eps):
    return row_norm.fake_forward(x, residual, n_cols, n_stats=1)  # rstd only


@torch.library.custom_op("normlib::triton_rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
    n_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is empty when there is no weight."""
    dx, dw, _no_db = row_norm._backward(dy, dh, x, weight, None, None, rstd, n_cols)
    return (dx, *row_norm.grads_or_empty(x, dw))


@_rms_norm_bwd_op.register_fake
def _(dy, dh, x, weight, rstd, n_cols):
    return row_norm.fake_backward(x, weight)


# The backward kernel, or PyTorch's composite where the backward must itself be differentiable.
row_norm.register_autograd(_rms_norm_fwd_op, _rms_norm_bwd_op, rms_norm_composite)


def rms_norm_triton(
    input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims with the fused Triton kernels (an entry
    point named in normlib.backends.IMPLEMENTATIONS, which says which inputs it takes; the public
    op has checked the arguments and resolved eps=None)."""
    y, _h, _rstd = _rms_norm_fwd_op(input, None, weight, math.prod(normalized_shape), eps)
    return y


def add_rms_norm_triton(
    input: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(input + residual), input + residual) in one pass over memory."""
    y, h, _rstd = _rms_norm_fwd_op(input, residual, weight, math.prod(normalized_shape), eps)
    return y, h
