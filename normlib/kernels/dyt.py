"""Fused Dynamic Tanh in Triton: forward and backward, with deterministic parameter gradients.

DyT (Zhu et al., 2025) is element-wise: for one row :math:`x \\in \\mathbb{R}^C` and one scalar alpha::

    t = tanh(alpha * x)
    y = t * w + b

There is no row statistic to compute, so the forward is a single streaming pass (read x, write y).
The backward is where the work is. With ``wdy = w * dy`` and ``slope = 1 - t^2``::

    dx     = wdy * alpha * slope                 element-wise
    dalpha = sum over every element of wdy * x * slope
    dw     = sum over rows of dy * t
    db     = sum over rows of dy

Three of the four are reductions across rows, and alpha's is across the whole tensor. As in
:mod:`normlib.kernels.row_norm`, the backward runs a fixed number of programs; program p walks rows
p, p + n_programs, ... and keeps its own fp32 partial sums of dw, db and dalpha, which
:func:`normlib.kernels._rows.sum_partials` then adds in a fixed order. No atomics: two runs give
the same bits.

tanh is computed from one exponential, ``tanh(|u|) = (1 - e^{-2|u|}) / (1 + e^{-2|u|})`` with the
sign put back, which never overflows (e^{-2|u|} <= 1). tanh(alpha x) is recomputed in the backward
from the saved x rather than stored: one exponential per element is cheaper than writing and
re-reading a tensor of the input's size.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from normlib.kernels._rows import (
    as_rows,
    backward_programs,
    block_config,
    check_device,
    sum_partials,
)

__all__ = ["dyt_triton"]


@triton.jit
def _tanh(u):
    # e in (0, 1]: no overflow for any u, and t in [0, 1) as it should be.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dyt_fwd_kernel(
    X,  # pointer to the input, (n_rows, n_cols) with row stride stride_x
    Y,  # pointer to the output, (n_rows, n_cols) contiguous
    ALPHA,  # pointer to the scalar alpha (read on the device: no host synchronization)
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    B,  # pointer to the bias (n_cols,), read only if HAS_BIAS
    stride_x,  # elements between the starts of two rows of X
    n_cols,  # row width C
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
):
    # One program per row, walking it in blocks (a single block when the row fits).
    row = tl.program_id(0).to(tl.int64)  # int64 so that row * stride cannot overflow
    X += row * stride_x
    Y += row * n_cols
    alpha = tl.load(ALPHA).to(tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        y = _tanh(alpha * x)
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dyt_bwd_kernel(
    DY,  # pointer to the gradient of y, (n_rows, n_cols) with row stride stride_dy
    X,  # pointer to the saved input, row stride stride_x
    ALPHA,  # pointer to the scalar alpha
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    DX,  # pointer to the gradient of x, (n_rows, n_cols) contiguous
    DALPHA_PARTIAL,  # pointer to the fp32 dalpha partials, (n_programs,)
    DW_PARTIAL,  # pointer to the fp32 dw partials, (n_programs, n_cols), written if HAS_WEIGHT
    DB_PARTIAL,  # pointer to the fp32 db partials, (n_programs, n_cols), written if HAS_BIAS
    stride_dy,  # elements between two rows of DY
    stride_x,  # same for X
    n_rows,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program p owns rows p, p + n_programs, ... and row p of each partial. Columns are the outer
    # loop so that the dw and db sums of one block of columns stay in registers over all of the
    # program's rows and are stored once.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    DW_PARTIAL += pid.to(tl.int64) * n_cols
    DB_PARTIAL += pid.to(tl.int64) * n_cols
    alpha = tl.load(ALPHA).to(tl.float32)
    dalpha = tl.zeros([BLOCK_N], dtype=tl.float32)  # lane-wise, summed once at the end
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)  # int64 before multiplying by a stride
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            t = _tanh(alpha * x)
            slope = 1.0 - t * t
            if HAS_WEIGHT:
                wdy = w * dy
            else:
                wdy = dy
            tl.store(DX + row64 * n_cols + cols, (wdy * alpha * slope).to(DX.dtype.element_ty), mask=mask)
            dalpha += wdy * x * slope  # masked lanes loaded x = dy = 0: they add 0
            dw += dy * t
            db += dy
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + cols, db, mask=mask)
    tl.store(DALPHA_PARTIAL + pid, tl.sum(dalpha, axis=0))


# ------------------------------------------------------------------------------------------------
# Wrappers: tensors in, tensors out (no autograd here)
# ------------------------------------------------------------------------------------------------


def _row_width(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> int:
    """The width of a row: the elements gamma and beta cover, or the last dimension without them."""
    param = weight if weight is not None else bias
    return param.numel() if param is not None else x.shape[-1]


def _forward(
    x: torch.Tensor, alpha: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    check_device(x, "dyt_triton")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    n_cols = _row_width(x, weight, bias)
    x_rows = as_rows(x, n_cols)  # (n_rows, n_cols)
    block_n, _single_block, num_warps = block_config(n_cols, x.element_size())
    _dyt_fwd_kernel[(x_rows.shape[0],)](
        x_rows,
        y,
        alpha,
        weight.reshape(-1).contiguous() if weight is not None else x_rows,
        bias.reshape(-1).contiguous() if bias is not None else x_rows,
        x_rows.stride(0),
        n_cols,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dalpha, dw, db); dw and db are None for an absent weight or bias."""
    check_device(x, "dyt_triton (backward)")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_cols = _row_width(x, weight, bias)
    n_rows = x.numel() // n_cols if n_cols else 0
    n_programs = backward_programs(n_rows, x.device)
    # zeros: with no rows the kernel does not run, and the sums of nothing must be 0
    alloc = torch.empty if n_rows > 0 else torch.zeros
    dalpha_partial = alloc((n_programs, 1), dtype=torch.float32, device=x.device)
    dw_partial = alloc((n_programs, n_cols), dtype=torch.float32, device=x.device) if weight is not None else None
    db_partial = alloc((n_programs, n_cols), dtype=torch.float32, device=x.device) if bias is not None else None
    if n_rows > 0:
        x_rows = as_rows(x, n_cols)
        dy_rows = as_rows(dy, n_cols)
        block_n, _single_block, num_warps = block_config(n_cols, x.element_size())
        _dyt_bwd_kernel[(n_programs,)](
            dy_rows,
            x_rows,
            alpha,
            weight.reshape(-1).contiguous() if weight is not None else x_rows,
            dx,
            dalpha_partial,
            dw_partial if dw_partial is not None else dalpha_partial,
            db_partial if db_partial is not None else dalpha_partial,
            dy_rows.stride(0),
            x_rows.stride(0),
            n_rows,
            n_cols,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    dalpha = sum_partials(dalpha_partial, alpha)
    dw = sum_partials(dw_partial, weight) if weight is not None else None
    db = sum_partials(db_partial, bias) if bias is not None else None
    return dx, dalpha, dw, db


# ------------------------------------------------------------------------------------------------
# The autograd op, registered with torch.library so that torch.compile can keep it in its graph
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlib::triton_dyt_fwd", mutates_args=())
def _dyt_fwd_op(
    x: torch.Tensor, alpha: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _forward(x, alpha, weight, bias)


@_dyt_fwd_op.register_fake
def _(x, alpha, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("normlib::triton_dyt_bwd", mutates_args=())
def _dyt_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dalpha, dw, db); an absent parameter's gradient is an empty tensor (an op's outputs
    cannot be None)."""
    dx, dalpha, dw, db = _backward(dy, x, alpha, weight, bias)
    empty = x.new_empty(0)
    return dx, dalpha, dw if dw is not None else empty, db if db is not None else empty.clone()


@_dyt_bwd_op.register_fake
def _(dy, x, alpha, weight, bias):
    return (
        x.new_empty(x.shape),
        alpha.new_empty(alpha.shape),
        weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, alpha, weight, bias = inputs
    ctx.save_for_backward(x, alpha, weight, bias)


def _backward_formula(ctx, dy):
    x, alpha, weight, bias = ctx.saved_tensors
    dx, dalpha, dw, db = _dyt_bwd_op(dy, x, alpha, weight, bias)
    return dx, dalpha, dw if weight is not None else None, db if bias is not None else None


_dyt_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry point named in normlib.backends.IMPLEMENTATIONS (arguments already checked by the public op)
# ------------------------------------------------------------------------------------------------


def dyt_triton(
    input: torch.Tensor, alpha: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Dynamic Tanh with the fused Triton kernels."""
    return _dyt_fwd_op(input, alpha, weight, bias)
