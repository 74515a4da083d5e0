"""Fused RMSNorm in Triton: forward, backward, and the residual-add + RMSNorm of a pre-norm block.

The same structure as :mod:`normlib.kernels.layer_norm`, with less to do: RMSNorm (Zhang and
Sennrich, 2019) neither subtracts the mean nor adds a bias. For one row :math:`x \\in \\mathbb{R}^C`,
with eps inside the square root as in ``torch.nn.RMSNorm``::

    rstd = 1 / sqrt(sum(x^2) / C + eps)
    x_hat = x * rstd
    y = x_hat * w

Backward, with ``wdy = w * dy`` and one row sum ``c1 = sum(x_hat * wdy) / C`` (LayerNorm's ``c2``,
the mean of ``wdy``, is absent because no mean was subtracted)::

    dx = (wdy - x_hat * c1) * rstd
    dw = sum over rows of dy * x_hat

The sum of squares has no cancellation (all terms are non-negative), so unlike LayerNorm the looped
path simply accumulates it block by block.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from normlib._autograd import (
    add_norm_double_backward,
    add_rms_norm_composite,
    double_backward,
    rms_norm_composite,
    torch_ops_only,
)
from normlib._checks import RMS_NORM_DEFAULT_EPS
from normlib.backends import BACKENDS
from normlib.kernels._rows import (
    as_rows,
    backward_programs,
    block_config,
    check_device,
    sum_partials,
)

__all__ = ["rms_norm_triton", "add_rms_norm_triton"]


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # pointer to the input, (n_rows, n_cols) with row stride stride_x
    R,  # pointer to the residual (same shape), read only if HAS_RESIDUAL
    H,  # pointer to h = x + r, written only if HAS_RESIDUAL
    Y,  # pointer to the output, (n_rows, n_cols) contiguous
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    RSTD,  # pointer to the per-row 1/rms (n_rows,), fp32, kept for the backward
    stride_x,  # elements between the starts of two rows of X
    stride_r,  # same for R
    n_cols,  # row width C (features per row)
    eps,  # added to the mean square before the square root
    HAS_RESIDUAL: tl.constexpr,  # add_rms_norm: normalize h = x + r and write h
    HAS_WEIGHT: tl.constexpr,  # multiply by w
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one block
):
    # One program per row; the row index is int64 so that row * stride cannot overflow int32.
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += row * stride_r
    H += row * n_cols
    Y += row * n_cols

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
            x = h.to(tl.float32)  # normalize h as stored, as the backward will see it
        mean_square = tl.sum(x * x, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(mean_square + eps)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Looped path: pass 1 accumulates the sum of squares block by block, pass 2 re-reads the
        # row (h, once it has been written) to scale it.
        sum_square = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
                h = (x + r).to(H.dtype.element_ty)
                tl.store(H + cols, h, mask=mask)
                x = h.to(tl.float32)
            sum_square += tl.sum(x * x, axis=0)
        rstd = 1.0 / tl.sqrt(sum_square / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            if HAS_RESIDUAL:
                x = tl.load(H + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # pointer to the gradient of y, (n_rows, n_cols) with row stride stride_dy
    DH,  # pointer to the gradient of the h output, read only if HAS_DH
    X,  # pointer to what was normalized (x, or h for add_rms_norm), row stride stride_x
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    RSTD,  # pointer to the saved per-row 1/rms (n_rows,), fp32
    DX,  # pointer to the gradient of x (and of the residual), (n_rows, n_cols) contiguous
    DW_PARTIAL,  # pointer to the fp32 dW partials, (n_programs, n_cols)
    stride_dy,  # elements between two rows of DY
    stride_dh,  # same for DH
    stride_x,  # same for X
    n_rows,  # number of rows
    n_cols,  # row width C (features per row)
    HAS_DH: tl.constexpr,  # h = x + r was used downstream too: its gradient adds to dx
    HAS_WEIGHT: tl.constexpr,  # the forward multiplied by w (compute dW)
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one block
):
    # Program p handles rows p, p + n_programs, ... and owns row p of DW_PARTIAL: no atomics, and
    # a fixed order of additions (see sum_partials for the second stage).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    DW_PARTIAL += pid.to(tl.int64) * n_cols

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)  # int64 before multiplying by a stride
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)
            x_hat = x * rstd
            if HAS_WEIGHT:
                wdy = w * dy
            else:
                wdy = dy
            c1 = tl.sum(x_hat * wdy, axis=0) / n_cols
            dx = (wdy - x_hat * c1) * rstd
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
    else:
        # Looped path: pass 1 gets c1, pass 2 writes dx and adds into the program's dW partial.
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)
            rstd = tl.load(RSTD + row64)
            c1 = 0.0
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                else:
                    wdy = dy
                c1 += tl.sum(x * rstd * wdy, axis=0)
            c1 = c1 / n_cols
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd
                if HAS_WEIGHT:
                    wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                else:
                    wdy = dy
                dx = (wdy - x_hat * c1) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    dw = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                    tl.store(DW_PARTIAL + cols, dw + dy * x_hat, mask=mask)


# ------------------------------------------------------------------------------------------------
# Wrappers: tensors in, tensors out (no autograd here)
# ------------------------------------------------------------------------------------------------


def _forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd); h is an empty tensor when there is no residual."""
    check_device(x, _rms_norm_fwd_kernel, "rms_norm_triton")
    x_rows = as_rows(x, n_cols)  # (n_rows, n_cols)
    n_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r_rows = as_rows(residual, n_cols)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r_rows = x_rows  # never read (HAS_RESIDUAL is False)
        h = torch.empty(0, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, h, rstd
    block_n, single_block, num_warps = block_config(n_cols, x.element_size())
    _rms_norm_fwd_kernel[(n_rows,)](
        x_rows,
        r_rows,
        h if residual is not None else y,
        y,
        weight.reshape(-1).contiguous() if weight is not None else x_rows,
        rstd,
        x_rows.stride(0),
        r_rows.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        SINGLE_BLOCK=single_block,
        num_warps=num_warps,
    )
    return y, h, rstd


def _backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    n_cols: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dx, dw) from the saved normalized input ``x`` (h for add_rms_norm)."""
    check_device(x, _rms_norm_bwd_kernel, "rms_norm_triton (backward)")
    x_rows = as_rows(x, n_cols)
    dy_rows = as_rows(dy, n_cols)
    dh_rows = as_rows(dh, n_cols) if dh is not None else dy_rows
    n_rows = x_rows.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_programs = backward_programs(n_rows, x.device)
    block_n, single_block, num_warps = block_config(n_cols, x.element_size())
    # Single block: every program stores its whole partial once. Looped: programs add into theirs.
    alloc = torch.empty if single_block and n_rows > 0 else torch.zeros
    dw_partial = alloc((n_programs, n_cols), dtype=torch.float32, device=x.device) if weight is not None else None
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy_rows,
            dh_rows,
            x_rows,
            weight.reshape(-1).contiguous() if weight is not None else x_rows,
            rstd,
            dx,
            dw_partial if dw_partial is not None else rstd,
            dy_rows.stride(0),
            dh_rows.stride(0),
            x_rows.stride(0),
            n_rows,
            n_cols,
            HAS_DH=dh is not None,
            HAS_WEIGHT=weight is not None,
            BLOCK_N=block_n,
            SINGLE_BLOCK=single_block,
            num_warps=num_warps,
        )
    dw = sum_partials(dw_partial, weight) if weight is not None else None
    return dx, dw


# ------------------------------------------------------------------------------------------------
# The autograd op, registered with torch.library so that torch.compile can keep it in its graph
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlib::triton_rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, n_cols, eps)


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, n_cols, eps):
    n_rows = x.numel() // n_cols
    h_shape = x.shape if residual is not None else (0,)
    return x.new_empty(x.shape), x.new_empty(h_shape), x.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("normlib::triton_rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    n_cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); dw is an empty tensor when there is no weight (an op's outputs cannot be None)."""
    dx, dw = _backward(dy, dh, x, weight, rstd, n_cols)
    return dx, dw if dw is not None else x.new_empty(0)


@_rms_norm_bwd_op.register_fake
def _(dy, dh, x, weight, rstd, n_cols):
    return x.new_empty(x.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, n_cols, eps = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.n_cols, ctx.eps = n_cols, eps


def _double_backward_formula(ctx, dy, dh):
    """create_graph=True: the kernels' backward is not differentiable, PyTorch's composite is (see
    :mod:`normlib._autograd`), differentiated at the saved input x or output h, on (rows, n_cols)
    views (the op knows the normalized shape only as ``n_cols``)."""
    normalized, weight, _ = ctx.saved_tensors
    shape, rows = (ctx.n_cols,), (-1, ctx.n_cols)
    needs = ctx.needs_input_grad

    def norm(t, w):
        w = None if w is None else w.reshape(shape)
        return rms_norm_composite(t.reshape(rows), w, shape, ctx.eps)[0].view(t.shape)

    if ctx.has_residual:
        dh_total, (dw,) = add_norm_double_backward(norm, normalized, (weight,), dy, dh, (needs[2],))
        return dh_total, dh_total, dw, None, None
    dx, dw = double_backward(lambda t, w: (norm(t, w),), (normalized, weight), (dy,), (needs[0], needs[2]))
    return dx, None, dw, None, None


def _backward_formula(ctx, dy, dh, _drstd):
    if torch.is_grad_enabled():  # create_graph=True
        return _double_backward_formula(ctx, dy, dh)
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    use_dh = ctx.has_residual and dh is not None
    dx, dw = _rms_norm_bwd_op(dy, dh if use_dh else None, x, weight, rstd, ctx.n_cols)
    # The input and the residual receive the same gradient: d(x + r)/dx = d(x + r)/dr = 1.
    return dx, dx if ctx.has_residual else None, dw if weight is not None else None, None, None


_rms_norm_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry points named in normlib.backends.IMPLEMENTATIONS (arguments already checked by the public op)
# ------------------------------------------------------------------------------------------------


def _composite_instead(input: torch.Tensor) -> bool:
    """Whether PyTorch's composite runs instead of the kernels: an empty input (nothing to launch;
    a zero-width row has no statistics), a torch.func transform or torch.jit.trace
    (:func:`normlib._autograd.torch_ops_only`). A dtype the float32 kernels would compute less
    precisely than it promises (float64, complex) is refused rather than computed wrongly."""
    reason = BACKENDS["triton"].unsupported_dtype_reason(input.dtype)
    if reason is not None:
        raise TypeError(f"backend='triton' cannot run this input: {reason}")
    return input.numel() == 0 or torch_ops_only(input)


def rms_norm_triton(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor],
    eps: Optional[float],
) -> torch.Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims with the fused Triton kernels."""
    eps = RMS_NORM_DEFAULT_EPS[input.dtype] if eps is None else eps  # None: torch's default
    if _composite_instead(input):
        return rms_norm_composite(input, weight, tuple(normalized_shape), eps)[0]
    y, _h, _rstd = _rms_norm_fwd_op(input, None, weight, math.prod(normalized_shape), eps)
    return y


def add_rms_norm_triton(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor],
    eps: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(input + residual), input + residual) in one pass over memory."""
    eps = RMS_NORM_DEFAULT_EPS[input.dtype] if eps is None else eps  # None: torch's default
    if _composite_instead(input):
        return add_rms_norm_composite(input, residual, weight, tuple(normalized_shape), eps)
    y, h, _rstd = _rms_norm_fwd_op(input, residual, weight, math.prod(normalized_shape), eps)
    return y, h
