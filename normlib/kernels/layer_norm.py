"""Fused LayerNorm in Triton: forward, backward, and the residual-add + LayerNorm of a pre-norm
Transformer block.

In this file you will find

* a forward kernel that reads each row once, computes its mean and variance in fp32 from
  registers, and writes the normalized row (and, for ``add_layer_norm``, the sum ``h = x + r``);
* a backward kernel that computes dX row by row and accumulates dW and dB in a private fp32
  partial per program, followed by a second-stage sum of those partials in a fixed order
  (deterministic: no atomics);
* the glue: a ``torch.library`` custom op with a fake (shape-only) implementation and an autograd
  formula, so the kernels run in eager mode and inside ``torch.compile``.

The math, for one row :math:`x \\in \\mathbb{R}^C` (Ba et al., 2016)::

    mean = sum(x) / C
    var  = sum((x - mean)^2) / C          biased, as in torch.nn.LayerNorm
    rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    y = x_hat * w + b

Backward, with ``wdy = w * dy`` and the two row sums ``c1 = sum(x_hat * wdy) / C`` and
``c2 = sum(wdy) / C``::

    dx = (wdy - (x_hat * c1 + c2)) * rstd
    dw = sum over rows of dy * x_hat
    db = sum over rows of dy

The layout follows Triton's layer-norm tutorial (Tillet et al., 2019); the looped path for rows
wider than one block merges per-block statistics with the pairwise formula of Chan et al. (1983),
so a row such as ``1e4 + N(0, 1)`` keeps its variance.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from normlib._autograd import (
    add_layer_norm_composite,
    add_norm_double_backward,
    double_backward,
    layer_norm_composite,
    torch_ops_only,
)
from normlib.backends import BACKENDS
from normlib.kernels._rows import (
    as_rows,
    backward_programs,
    block_config,
    check_device,
    sum_partials,
)

__all__ = ["layer_norm_triton", "add_layer_norm_triton"]


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _row_shift(
    X,  # pointer to the start of the row of x
    R,  # pointer to the start of the row of the residual
    H,  # pointer to the start of the row of h (only its dtype is used)
    HAS_RESIDUAL: tl.constexpr,  # the row normalized is h = x + r
):
    # The row's first element, a cheap guess of its mean. Sums of x - shift instead of x stay
    # small when all elements are large and close (1e4 + N(0, 1)): summing the raw values in fp32
    # would lose the digits that carry the spread ("shifted data", Chan et al., 1983).
    shift = tl.load(X).to(tl.float32)
    if HAS_RESIDUAL:
        shift = (shift + tl.load(R).to(tl.float32)).to(H.dtype.element_ty).to(tl.float32)
    return shift


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input, (n_rows, n_cols) with row stride stride_x
    R,  # pointer to the residual (same shape), read only if HAS_RESIDUAL
    H,  # pointer to h = x + r, written only if HAS_RESIDUAL
    Y,  # pointer to the output, (n_rows, n_cols) contiguous
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    B,  # pointer to the bias (n_cols,), read only if HAS_BIAS
    MEAN,  # pointer to the per-row mean (n_rows,), fp32, kept for the backward
    RSTD,  # pointer to the per-row 1/std (n_rows,), fp32, kept for the backward
    stride_x,  # elements between the starts of two rows of X
    stride_r,  # same for R
    n_cols,  # row width C (features per row)
    eps,  # added to the variance before the square root
    HAS_RESIDUAL: tl.constexpr,  # add_layer_norm: normalize h = x + r and write h
    HAS_WEIGHT: tl.constexpr,  # multiply by w
    HAS_BIAS: tl.constexpr,  # add b
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one block
):
    # One program normalizes one row. The row index is widened to int64 before it is multiplied by
    # a stride: row * stride overflows int32 once a tensor holds more than 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += row * stride_r
    H += row * n_cols
    Y += row * n_cols

    if SINGLE_BLOCK:
        # The whole row lives in registers: one read, statistics in fp32, one write.
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
            # Normalize h as stored (rounded to the input dtype), as the torch composite does and
            # as the backward will see it.
            x = h.to(tl.float32)
        shift = _row_shift(X, R, H, HAS_RESIDUAL)
        x_shifted = tl.where(mask, x - shift, 0.0)
        mean_shifted = tl.sum(x_shifted, axis=0) / n_cols
        mean = shift + mean_shifted
        # Two passes over registers, not E[x^2] - E[x]^2: subtracting the mean first keeps the
        # variance accurate when |mean| >> std (cancellation).
        x_centered = tl.where(mask, x_shifted - mean_shifted, 0.0)
        var = tl.sum(x_centered * x_centered, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        y = x_centered * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Looped path for rows wider than one block. Pass 1 walks the row block by block and merges
        # each block's (count, mean, M2) into the running ones (Chan et al.), which avoids the
        # cancellation of E[x^2] - E[x]^2. Pass 2 reads the row again to normalize it.
        shift = _row_shift(X, R, H, HAS_RESIDUAL)
        mean = 0.0  # of x - shift, until the loop ends
        m2 = 0.0
        count = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
                h = (x + r).to(H.dtype.element_ty)
                tl.store(H + cols, h, mask=mask)
                x = h.to(tl.float32)
            x = tl.where(mask, x - shift, 0.0)
            block_count = tl.minimum(n_cols - start, BLOCK_N).to(tl.float32)
            block_mean = tl.sum(x, axis=0) / block_count
            block_centered = tl.where(mask, x - block_mean, 0.0)
            block_m2 = tl.sum(block_centered * block_centered, axis=0)
            total = count + block_count
            delta = block_mean - mean
            mean += delta * (block_count / total)
            m2 += block_m2 + delta * delta * (count * block_count / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            if HAS_RESIDUAL:
                x = tl.load(H + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = ((x - shift) - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        mean += shift
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # pointer to the gradient of y, (n_rows, n_cols) with row stride stride_dy
    DH,  # pointer to the gradient of the h output, read only if HAS_DH
    X,  # pointer to what was normalized (x, or h for add_layer_norm), row stride stride_x
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    MEAN,  # pointer to the saved per-row mean (n_rows,), fp32
    RSTD,  # pointer to the saved per-row 1/std (n_rows,), fp32
    DX,  # pointer to the gradient of x (and of the residual), (n_rows, n_cols) contiguous
    DW_PARTIAL,  # pointer to this kernel's fp32 dW partials, (n_programs, n_cols)
    DB_PARTIAL,  # pointer to the fp32 dB partials, (n_programs, n_cols)
    stride_dy,  # elements between two rows of DY
    stride_dh,  # same for DH
    stride_x,  # same for X
    n_rows,  # number of rows
    n_cols,  # row width C (features per row)
    HAS_DH: tl.constexpr,  # h = x + r was used downstream too: its gradient adds to dx
    HAS_WEIGHT: tl.constexpr,  # the forward multiplied by w (compute dW)
    HAS_BIAS: tl.constexpr,  # the forward added b (compute dB)
    BLOCK_N: tl.constexpr,  # columns per block, a power of two
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one block
):
    # Program p handles rows p, p + n_programs, p + 2 * n_programs, ... and sums their dW/dB
    # contributions into its own partial row: nobody else writes there, so no atomics are needed,
    # and the order of the additions is fixed.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    DW_PARTIAL += pid.to(tl.int64) * n_cols
    DB_PARTIAL += pid.to(tl.int64) * n_cols

    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)  # int64 before multiplying by a stride
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                wdy = w * dy
            else:
                wdy = dy
            c1 = tl.sum(x_hat * wdy, axis=0) / n_cols
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - (x_hat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
            db += dy
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + cols, db, mask=mask)
    else:
        # Looped path: pass 1 over the row's blocks gets c1 and c2, pass 2 writes dx and adds this
        # row's dW/dB into the program's partial (zero-initialized, private to the program).
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)
            mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                else:
                    wdy = dy
                c1 += tl.sum(x_hat * wdy, axis=0)
                c2 += tl.sum(wdy, axis=0)
            c1 = c1 / n_cols
            c2 = c2 / n_cols
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
                else:
                    wdy = dy
                dx = (wdy - (x_hat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    dw = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                    tl.store(DW_PARTIAL + cols, dw + dy * x_hat, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_PARTIAL + cols, mask=mask, other=0.0)
                    tl.store(DB_PARTIAL + cols, db + dy, mask=mask)


# ------------------------------------------------------------------------------------------------
# Wrappers: tensors in, tensors out (no autograd here)
# ------------------------------------------------------------------------------------------------


def _forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h is an empty tensor when there is no residual."""
    check_device(x, _layer_norm_fwd_kernel, "layer_norm_triton")
    x_rows = as_rows(x, n_cols)  # (n_rows, n_cols)
    n_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r_rows = as_rows(residual, n_cols)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r_rows = x_rows  # never read (HAS_RESIDUAL is False); any valid tensor will do
        h = torch.empty(0, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    block_n, single_block, num_warps = block_config(n_cols, x.element_size())
    _layer_norm_fwd_kernel[(n_rows,)](
        x_rows,
        r_rows,
        h if residual is not None else y,
        y,
        weight.reshape(-1).contiguous() if weight is not None else x_rows,
        bias.reshape(-1).contiguous() if bias is not None else x_rows,
        mean,
        rstd,
        x_rows.stride(0),
        r_rows.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        SINGLE_BLOCK=single_block,
        num_warps=num_warps,
    )
    return y, h, mean, rstd


def _backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    has_bias: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    n_cols: int,
    bias_like: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dw, db) from the saved normalized input ``x`` (h for add_layer_norm)."""
    check_device(x, _layer_norm_bwd_kernel, "layer_norm_triton (backward)")
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
    db_partial = alloc((n_programs, n_cols), dtype=torch.float32, device=x.device) if has_bias else None
    if n_rows > 0:
        _layer_norm_bwd_kernel[(n_programs,)](
            dy_rows,
            dh_rows,
            x_rows,
            weight.reshape(-1).contiguous() if weight is not None else x_rows,
            mean,
            rstd,
            dx,
            dw_partial if dw_partial is not None else mean,
            db_partial if db_partial is not None else mean,
            dy_rows.stride(0),
            dh_rows.stride(0),
            x_rows.stride(0),
            n_rows,
            n_cols,
            HAS_DH=dh is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=has_bias,
            BLOCK_N=block_n,
            SINGLE_BLOCK=single_block,
            num_warps=num_warps,
        )
    dw = sum_partials(dw_partial, weight) if weight is not None else None
    db = sum_partials(db_partial, bias_like) if has_bias else None
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# The autograd op, registered with torch.library so that torch.compile can keep it in its graph
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("normlib::triton_layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, bias, n_cols, eps)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, n_cols, eps):
    n_rows = x.numel() // n_cols
    h_shape = x.shape if residual is not None else (0,)
    return (
        x.new_empty(x.shape),
        x.new_empty(h_shape),
        x.new_empty(n_rows, dtype=torch.float32),
        x.new_empty(n_rows, dtype=torch.float32),
    )


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
    """(dx, dw, db); dw and db are empty tensors for an absent weight or bias (an op's outputs
    cannot be None)."""
    dx, dw, db = _backward(dy, dh, x, weight, bias is not None, mean, rstd, n_cols, bias)
    empty = x.new_empty(0)
    return dx, dw if dw is not None else empty, db if db is not None else empty.clone()


@_layer_norm_bwd_op.register_fake
def _(dy, dh, x, weight, bias, mean, rstd, n_cols):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, n_cols, eps = inputs
    _y, h, mean, rstd = output
    # The backward needs what was normalized: h for add_layer_norm (stored by the forward anyway),
    # else x. Not y: recomputing x_hat from x, mean and rstd is exact and costs no extra memory.
    ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
    ctx.has_residual = residual is not None
    ctx.n_cols, ctx.eps = n_cols, eps


def _double_backward_formula(ctx, dy, dh):
    """create_graph=True: the kernels' backward is not differentiable, PyTorch's composite is (see
    :mod:`normlib._autograd`), differentiated at the saved input x or output h, on (rows, n_cols)
    views (the op knows the normalized shape only as ``n_cols``)."""
    normalized, weight, bias, _, _ = ctx.saved_tensors
    shape, rows = (ctx.n_cols,), (-1, ctx.n_cols)
    needs = ctx.needs_input_grad

    def norm(t, w, b):
        w = None if w is None else w.reshape(shape)
        b = None if b is None else b.reshape(shape)
        return layer_norm_composite(t.reshape(rows), w, b, shape, ctx.eps)[0].view(t.shape)

    if ctx.has_residual:
        dh_total, (dw, db) = add_norm_double_backward(norm, normalized, (weight, bias), dy, dh, needs[2:4])
        return dh_total, dh_total, dw, db, None, None
    dx, dw, db = double_backward(
        lambda t, w, b: (norm(t, w, b),), (normalized, weight, bias), (dy,), (needs[0], *needs[2:4])
    )
    return dx, None, dw, db, None, None


def _backward_formula(ctx, dy, dh, _dmean, _drstd):
    if torch.is_grad_enabled():  # create_graph=True
        return _double_backward_formula(ctx, dy, dh)
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    use_dh = ctx.has_residual and dh is not None
    dx, dw, db = _layer_norm_bwd_op(dy, dh if use_dh else None, x, weight, bias, mean, rstd, ctx.n_cols)
    # d(x + r)/dx = d(x + r)/dr = 1: the input and the residual receive the same gradient.
    return (
        dx,
        dx if ctx.has_residual else None,
        dw if weight is not None else None,
        db if bias is not None else None,
        None,
        None,
    )


_layer_norm_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


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


def layer_norm_triton(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dims with the fused Triton kernels."""
    if _composite_instead(input):
        return layer_norm_composite(input, weight, bias, tuple(normalized_shape), eps)[0]
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
    if _composite_instead(input):
        return add_layer_norm_composite(input, residual, weight, bias, tuple(normalized_shape), eps)
    y, h, _mean, _rstd = _layer_norm_fwd_op(
        input, residual, weight, bias, math.prod(normalized_shape), float(eps)
    )
    return y, h
