"""One fused Triton kernel family for the row norms: LayerNorm and RMSNorm, forward and backward,
with the residual add of a pre-norm Transformer block in front.

In this file you will find

* one forward kernel that reads each row once, computes its statistics in fp32 from registers and
  writes the normalized row (and, with a residual, the sum ``h = x + r``);
* one backward kernel that computes dX row by row and accumulates dW and dB in a private fp32
  partial per program, followed by a second-stage sum of those partials in a fixed order
  (:func:`normlib.kernels._rows.sum_partials`; deterministic, no atomics);
* the tensor-level wrappers :func:`_forward` and :func:`_backward`, and the glue that the two entry
  points :mod:`normlib.kernels.layer_norm` and :mod:`normlib.kernels.rms_norm` share.

Compile-time flags (``tl.constexpr``) choose the variant, as in flash-attention's
``ops/triton/layer_norm.py`` (Dao, 2023): ``IS_RMS`` (RMSNorm instead of LayerNorm),
``HAS_RESIDUAL``, ``HAS_WEIGHT``, ``HAS_BIAS``, ``HAS_DH`` (the sum h was used downstream too),
``BLOCK_N`` and ``SINGLE_BLOCK`` (the row fits in one block of registers). A flag that is off
removes its code from the compiled kernel, so each variant is as lean as a kernel written for it.

The math, for one row :math:`x \\in \\mathbb{R}^C`, LayerNorm (Ba et al., 2016) beside RMSNorm
(Zhang and Sennrich, 2019), eps inside the square root as in ``torch.nn``::

    LayerNorm                                RMSNorm
    mean = sum(x) / C                        (no mean: nothing is subtracted)
    var  = sum((x - mean)^2) / C   biased    ms   = sum(x^2) / C
    rstd = 1 / sqrt(var + eps)               rstd = 1 / sqrt(ms + eps)
    x_hat = (x - mean) * rstd                x_hat = x * rstd
    y = x_hat * w + b                        y = x_hat * w

Backward, with ``wdy = w * dy`` and the row sums ``c1 = sum(x_hat * wdy) / C`` and (LayerNorm only,
the mean of ``wdy``, which the subtracted mean contributes) ``c2 = sum(wdy) / C``::

    dx = (wdy - (x_hat * c1 + c2)) * rstd    dx = (wdy - x_hat * c1) * rstd
    dw = sum over rows of dy * x_hat         dw = sum over rows of dy * x_hat
    db = sum over rows of dy

The statistics are where the two differ. LayerNorm's variance subtracts the mean, and with
``|mean| >> std`` (a row such as ``1e4 + N(0, 1)``) summing raw values in fp32 loses the digits that
carry the spread; so the kernel sums ``x - shift`` for a cheap guess ``shift`` of the mean (the
row's first element), and rows wider than one block merge per-block (count, mean, M2) with the
pairwise formula of Chan et al. (1983). RMSNorm's mean square is a sum of non-negative terms, with
no cancellation to guard against: no shift, and the looped path simply accumulates it block by
block. The layout follows Triton's layer-norm tutorial (Tillet et al., 2019).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from normlib._autograd import add_norm_double_backward, double_backward
from normlib.backends import triton_dtypes
from normlib.kernels._rows import (
    as_rows,
    backward_programs,
    block_config,
    check_device,
    sum_partials,
)

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
def _load_row_block(
    X,  # pointer to the start of the row of x
    R,  # pointer to the start of the row of the residual, read only if HAS_RESIDUAL
    H,  # pointer to the start of the row of h, written only if HAS_RESIDUAL
    cols,  # the block's column indices
    mask,  # which of them lie inside the row
    HAS_RESIDUAL: tl.constexpr,  # the row normalized is h = x + r
):
    # The block of the row to normalize, in fp32 (0 outside the row, so sums ignore those lanes).
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + cols, h, mask=mask)
        # Normalize h as stored (rounded to the input dtype), as the torch composite does and as
        # the backward will see it.
        x = h.to(tl.float32)
    return x


@triton.jit
def _row_norm_fwd_kernel(
    X,  # pointer to the input, (n_rows, n_cols) with row stride stride_x
    R,  # pointer to the residual (same shape), read only if HAS_RESIDUAL
    H,  # pointer to h = x + r, written only if HAS_RESIDUAL
    Y,  # pointer to the output, (n_rows, n_cols) contiguous
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    B,  # pointer to the bias (n_cols,), read only if HAS_BIAS
    MEAN,  # pointer to the per-row mean (n_rows,), fp32, kept for the backward; unused if IS_RMS
    RSTD,  # pointer to the per-row 1/std (1/rms if IS_RMS), (n_rows,), fp32, kept for the backward
    stride_x,  # elements between the starts of two rows of X
    stride_r,  # same for R
    n_cols,  # row width C (features per row)
    eps,  # added to the variance (mean square if IS_RMS) before the square root
    IS_RMS: tl.constexpr,  # RMSNorm: no mean subtracted, no shift needed
    HAS_RESIDUAL: tl.constexpr,  # normalize h = x + r and write h
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
        x = _load_row_block(X, R, H, cols, mask, HAS_RESIDUAL)
        if IS_RMS:
            x_centered = x  # nothing subtracted: the sum of squares below is the mean square's
        else:
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
        # Looped path for rows wider than one block: pass 1 walks the row block by block for the
        # statistics, pass 2 reads the row again (h, once it has been written) to normalize it.
        # LayerNorm merges each block's (count, mean, M2) into the running ones (Chan et al.), which
        # avoids the cancellation of E[x^2] - E[x]^2; RMSNorm just adds up the squares in m2.
        if not IS_RMS:
            shift = _row_shift(X, R, H, HAS_RESIDUAL)
        mean = 0.0  # of x - shift, until the loop ends
        m2 = 0.0
        count = 0.0
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n_cols
            x = _load_row_block(X, R, H, cols, mask, HAS_RESIDUAL)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
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
            if IS_RMS:
                y = x * rstd
            else:
                y = ((x - shift) - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=mask).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + cols, mask=mask).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        if not IS_RMS:
            mean += shift
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _normalized_block(x, mean, rstd, mask, IS_RMS: tl.constexpr):
    # x_hat of one block, recomputed from what was normalized and the saved statistics: exact, and
    # cheaper than saving y. LayerNorm zeroes the lanes outside the row, where x - mean is not 0.
    if IS_RMS:
        x_hat = x * rstd
    else:
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    return x_hat


@triton.jit
def _backward_block(
    X,  # pointer to the start of the row of what was normalized
    DY,  # pointer to the start of the row of the gradient of y
    W,  # pointer to the weight, read only if HAS_WEIGHT
    cols,  # the block's column indices
    mask,  # which of them lie inside the row
    mean,  # the row's saved mean (unused if IS_RMS)
    rstd,  # the row's saved 1/std (1/rms if IS_RMS)
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    # What both passes of the looped backward need from one block: x_hat, dy and w * dy, in fp32.
    # The weight is re-read per block (it does not fit in registers beside a row this wide).
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    x_hat = _normalized_block(x, mean, rstd, mask, IS_RMS)
    if HAS_WEIGHT:
        wdy = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * dy
    else:
        wdy = dy
    return x_hat, dy, wdy


@triton.jit
def _row_norm_bwd_kernel(
    DY,  # pointer to the gradient of y, (n_rows, n_cols) with row stride stride_dy
    DH,  # pointer to the gradient of the h output, read only if HAS_DH
    X,  # pointer to what was normalized (x, or h with a residual), row stride stride_x
    W,  # pointer to the weight (n_cols,), read only if HAS_WEIGHT
    MEAN,  # pointer to the saved per-row mean (n_rows,), fp32; unused if IS_RMS
    RSTD,  # pointer to the saved per-row 1/std (1/rms if IS_RMS), (n_rows,), fp32
    DX,  # pointer to the gradient of x (and of the residual), (n_rows, n_cols) contiguous
    DW_PARTIAL,  # pointer to this kernel's fp32 dW partials, (n_programs, n_cols)
    DB_PARTIAL,  # pointer to the fp32 dB partials, (n_programs, n_cols)
    stride_dy,  # elements between two rows of DY
    stride_dh,  # same for DH
    stride_x,  # same for X
    n_rows,  # number of rows
    n_cols,  # row width C (features per row)
    IS_RMS: tl.constexpr,  # RMSNorm: no mean, so no c2 term
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
            if IS_RMS:
                mean = 0.0  # unused: RMSNorm subtracts no mean
            else:
                mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            x_hat = _normalized_block(x, mean, rstd, mask, IS_RMS)
            if HAS_WEIGHT:
                wdy = w * dy
            else:
                wdy = dy
            c1 = tl.sum(x_hat * wdy, axis=0) / n_cols
            if IS_RMS:
                dx = (wdy - x_hat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / n_cols
                dx = (wdy - (x_hat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
            if HAS_BIAS:
                db += dy
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + cols, db, mask=mask)
    else:
        # Looped path: pass 1 over the row's blocks gets c1 (and c2), pass 2 writes dx and adds this
        # row's dW/dB into the program's partial (zero-initialized, private to the program).
        for row in range(pid, n_rows, n_programs):
            row64 = tl.full([], row, tl.int64)
            if IS_RMS:
                mean = 0.0  # unused: RMSNorm subtracts no mean
            else:
                mean = tl.load(MEAN + row64)
            rstd = tl.load(RSTD + row64)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x_hat, dy, wdy = _backward_block(
                    X + row64 * stride_x, DY + row64 * stride_dy, W, cols, mask, mean, rstd, IS_RMS, HAS_WEIGHT
                )
                c1 += tl.sum(x_hat * wdy, axis=0)
                if not IS_RMS:
                    c2 += tl.sum(wdy, axis=0)
            c1 = c1 / n_cols
            c2 = c2 / n_cols  # stays 0 for RMSNorm, which does not use it
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < n_cols
                x_hat, dy, wdy = _backward_block(
                    X + row64 * stride_x, DY + row64 * stride_dy, W, cols, mask, mean, rstd, IS_RMS, HAS_WEIGHT
                )
                if IS_RMS:
                    dx = (wdy - x_hat * c1) * rstd
                else:
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


def _variant(
    is_rms: bool, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], n_cols: int, element_size: int
) -> dict:
    """The compile-time flags and launch options the forward and the backward launch share."""
    block_n, single_block, num_warps = block_config(n_cols, element_size)
    return dict(
        IS_RMS=is_rms,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        SINGLE_BLOCK=single_block,
        num_warps=num_warps,
    )


def _flat_or(parameter: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """The parameter as the contiguous vector the kernels index, or, where it is absent (its flag
    is off, so the kernel never reads it), any valid tensor to pass in its place."""
    return parameter.reshape(-1).contiguous() if parameter is not None else placeholder


def _forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    n_cols: int,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(y, h, mean, rstd); h is an empty tensor when there is no residual, mean is None for RMSNorm."""
    name = "rms_norm_triton" if is_rms else "layer_norm_triton"
    check_device(x, name)
    reason = triton_dtypes(x, weight, bias)
    if reason is not None:  # a direct call: normlib.backends never sends these dtypes here
        raise TypeError(f"{name}: {reason}")
    x_rows = as_rows(x, n_cols)  # (n_rows, n_cols)
    n_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r_rows = as_rows(residual, n_cols)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r_rows = x_rows  # never read (HAS_RESIDUAL is False); any valid tensor will do
        h = torch.empty(0, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    _row_norm_fwd_kernel[(n_rows,)](
        x_rows,
        r_rows,
        h if residual is not None else y,
        y,
        _flat_or(weight, x_rows),
        _flat_or(bias, x_rows),
        mean if mean is not None else rstd,  # never written for RMSNorm
        rstd,
        x_rows.stride(0),
        r_rows.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        **_variant(is_rms, weight, bias, n_cols, x.element_size()),
    )
    return y, h, mean, rstd


def _backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    n_cols: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dw, db) from the saved normalized input ``x`` (h with a residual); ``mean`` is None for
    RMSNorm, and dw, db are None for an absent weight, bias."""
    is_rms = mean is None
    check_device(x, f"{'rms' if is_rms else 'layer'}_norm_triton (backward)")
    x_rows = as_rows(x, n_cols)
    dy_rows = as_rows(dy, n_cols)
    dh_rows = as_rows(dh, n_cols) if dh is not None else dy_rows
    n_rows = x_rows.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_programs = backward_programs(n_rows, x.device)
    variant = _variant(is_rms, weight, bias, n_cols, x.element_size())
    # Single block: every program stores its whole partial once. Looped: programs add into theirs.
    alloc = torch.empty if variant["SINGLE_BLOCK"] and n_rows > 0 else torch.zeros
    partial_shape = (n_programs, n_cols)
    dw_partial = alloc(partial_shape, dtype=torch.float32, device=x.device) if weight is not None else None
    db_partial = alloc(partial_shape, dtype=torch.float32, device=x.device) if bias is not None else None
    if n_rows > 0:
        _row_norm_bwd_kernel[(n_programs,)](
            dy_rows,
            dh_rows,
            x_rows,
            _flat_or(weight, x_rows),
            mean if mean is not None else rstd,  # never read for RMSNorm
            rstd,
            dx,
            dw_partial if dw_partial is not None else rstd,
            db_partial if db_partial is not None else rstd,
            dy_rows.stride(0),
            dh_rows.stride(0),
            x_rows.stride(0),
            n_rows,
            n_cols,
            HAS_DH=dh is not None,
            **variant,
        )
    dw = sum_partials(dw_partial, weight) if weight is not None else None
    db = sum_partials(db_partial, bias) if bias is not None else None
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Glue both entry points share. Their custom ops take (x, residual, *parameters, n_cols, eps) and
# return (y, h, *statistics); their backward ops take (dy, dh, normalized, *parameters,
# *statistics, n_cols) and return (dx, *parameter gradients). LayerNorm's parameters are (weight,
# bias) and its statistics (mean, rstd); RMSNorm's are (weight,) and (rstd,).
# ------------------------------------------------------------------------------------------------


def fake_forward(x: torch.Tensor, residual: Optional[torch.Tensor], n_cols: int, n_stats: int) -> tuple:
    """Shape-only outputs of a forward op: (y, h, then ``n_stats`` fp32 per-row statistics); h is
    empty without a residual."""
    n_rows = x.numel() // n_cols
    h_shape = x.shape if residual is not None else (0,)
    stats = tuple(x.new_empty(n_rows, dtype=torch.float32) for _ in range(n_stats))
    return (x.new_empty(x.shape), x.new_empty(h_shape), *stats)


def grads_or_empty(x: torch.Tensor, *grads: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``grads`` with each None replaced by its own empty tensor: a custom op's outputs cannot be
    None, nor alias one another."""
    return tuple(x.new_empty(0) if grad is None else grad for grad in grads)


def fake_backward(x: torch.Tensor, *parameters: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Shape-only outputs of a backward op: dx, then one gradient per parameter (empty if absent)."""
    return (x.new_empty(x.shape), *(x.new_empty(0) if p is None else p.new_empty(p.shape) for p in parameters))


def _double_backward_on_rows(
    ctx,
    composite: Callable[..., tuple[torch.Tensor, ...]],
    normalized: torch.Tensor,
    parameters: Sequence[Optional[torch.Tensor]],
    dy: Optional[torch.Tensor],
    dh: Optional[torch.Tensor],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Optional[torch.Tensor]]]:
    """create_graph=True: the kernels' backward is not differentiable, PyTorch's composite is (see
    :mod:`normlib._autograd`), differentiated at the saved input x or output h, on (rows, n_cols)
    views (the op knows the normalized shape only as ``n_cols``). ``composite(t, *parameters,
    shape, eps)`` is the norm in PyTorch ops. Returns (dx, dresidual, parameter gradients)."""
    shape, rows = (ctx.n_cols,), (-1, ctx.n_cols)
    needs_parameter_grad = ctx.needs_input_grad[2 : 2 + len(parameters)]

    def norm(t, *params):
        params = [None if p is None else p.reshape(shape) for p in params]
        return composite(t.reshape(rows), *params, shape, ctx.eps)[0].view(t.shape)

    if ctx.has_residual:
        dh_total, parameter_grads = add_norm_double_backward(
            norm, normalized, parameters, dy, dh, needs_parameter_grad
        )
        return dh_total, dh_total, parameter_grads
    dx, *parameter_grads = double_backward(
        lambda t, *params: (norm(t, *params),),
        (normalized, *parameters),
        (dy,),
        (ctx.needs_input_grad[0], *needs_parameter_grad),
    )
    return dx, None, parameter_grads


def register_autograd(
    forward_op: torch.library.CustomOpDef,
    backward_op: torch.library.CustomOpDef,
    composite: Callable[..., tuple[torch.Tensor, ...]],
) -> None:
    """Give ``forward_op`` its gradient: ``backward_op`` (the backward kernel), or, for a backward
    that must itself be differentiable, ``composite`` (the same norm in PyTorch ops)."""

    def setup_context(ctx, inputs, output) -> None:
        x, residual, *parameters, n_cols, eps = inputs
        _y, h, *statistics = output
        # The backward needs what was normalized: h with a residual (stored by the forward anyway),
        # else x. Not y: recomputing x_hat from it and the statistics is exact and costs no memory.
        ctx.save_for_backward(h if residual is not None else x, *parameters, *statistics)
        ctx.n_parameters = len(parameters)
        ctx.has_residual = residual is not None
        ctx.n_cols, ctx.eps = n_cols, eps

    def backward(ctx, dy, dh, *_dstatistics):
        normalized, *saved = ctx.saved_tensors
        parameters = saved[: ctx.n_parameters]
        if torch.is_grad_enabled():  # create_graph=True
            dx, dresidual, grads = _double_backward_on_rows(ctx, composite, normalized, parameters, dy, dh)
        else:
            if dy is None:  # only h received a gradient
                dy = torch.zeros_like(normalized)
            use_dh = ctx.has_residual and dh is not None
            dx, *grads = backward_op(dy, dh if use_dh else None, normalized, *saved, ctx.n_cols)
            # d(x + r)/dx = d(x + r)/dr = 1: the input and the residual receive the same gradient.
            dresidual = dx if ctx.has_residual else None
        grads = [grad if parameter is not None else None for grad, parameter in zip(grads, parameters)]
        return dx, dresidual, *grads, None, None  # nothing for n_cols and eps

    forward_op.register_autograd(backward, setup_context=setup_context)
