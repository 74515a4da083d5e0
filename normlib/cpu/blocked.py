"""The fallback CPU path in plain PyTorch: RMSNorm processed in blocks of rows that stay in cache.

Used where the fused C kernels (``rms_norm.c``) cannot run: no C compiler or Python headers,
float64 inputs, or a weight whose dtype differs from the input's. It is slower than the C kernels (each step below is a
separate pass over the block) but, unlike ``torch.nn.functional.rms_norm``, it allocates no
full-size temporaries: every intermediate lives in a block-sized scratch buffer reused from block to
block, and the only full-size allocations are the outputs. It is still slower than
F.layer_norm, because each step is a pass of its own (``python -m normlib.bench`` measures it when
the C kernels are unavailable).

float16 and bfloat16 inputs are computed in float32; float64 in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["forward", "backward"]

# Bytes of one block of rows in the compute dtype. Small blocks pay PyTorch's per-op overhead many
# times; large ones let the backward's buffers spill out of the L2 cache (the measurements behind
# this choice are in results/cpu/blocked_chunk_bytes.json).
_CHUNK_BYTES = 1024 * 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(width: int, dtype: torch.dtype) -> int:
    element_size = torch.finfo(dtype).bits // 8
    return max(1, _CHUNK_BYTES // (width * element_size))


def forward(
    x: Tensor,  # (rows, width): the rows to normalize (or to add residual to first)
    residual: Tensor | None,  # (rows, width) or None: if given, h = x + residual is normalized
    weight: Tensor | None,  # (width,) gamma, or None
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Returns ``(y, h, rstd)``: y (rows, width), h (rows, width) or None, rstd (rows,) in the compute dtype."""
    rows, width = x.shape
    compute = _compute_dtype(x.dtype)
    y = torch.empty((rows, width), dtype=x.dtype)  # PyTorch's dtype, whatever the weight's
    h = None if residual is None else torch.empty((rows, width), dtype=x.dtype)
    rstd = torch.empty(rows, dtype=compute)
    if rows == 0 or width == 0:
        rstd.fill_(eps).rsqrt_()  # 1 / sqrt(0 + eps); eps=0 gives inf, as torch does, not an error
        return y, h, rstd
    gamma = None if weight is None else weight.reshape(width).to(compute)
    eps_tensor = torch.tensor(eps, dtype=compute)
    step = _rows_per_chunk(width, compute)
    # float16/bfloat16 rows are copied to float32 here, one chunk at a time
    scratch = torch.empty((min(step, rows), width), dtype=compute) if x.dtype != compute else None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x_chunk = x[start:stop]  # (m, width)
        if h is not None:
            x_chunk = torch.add(x_chunk, residual[start:stop], out=h[start:stop])
        if scratch is not None:
            x_chunk = scratch[: stop - start].copy_(x_chunk)
        r = rstd[start:stop]  # (m,)
        torch.linalg.vector_norm(x_chunk, dim=-1, out=r)
        # rstd = 1 / sqrt(sum(x^2) / width + eps), in two small ops on the chunk's norms
        torch.addcmul(eps_tensor, r, r, value=1.0 / width, out=r).rsqrt_()
        y_chunk = y[start:stop]
        if gamma is None:
            torch.mul(x_chunk, r.unsqueeze(1), out=y_chunk)
        elif scratch is None:
            torch.mul(x_chunk, r.unsqueeze(1), out=y_chunk).mul_(gamma)
        else:
            # y is float16/bfloat16: scale in float32 in the scratch, round once when writing y
            torch.mul(x_chunk.mul_(r.unsqueeze(1)), gamma, out=y_chunk)
    return y, h, rstd


def backward(
    dy: Tensor,  # (rows, width): dL/dy
    dh: Tensor | None,  # (rows, width): dL/dh arriving on the returned h, or None
    x: Tensor,  # (rows, width): what was normalized (input, or h for the residual op)
    rstd: Tensor,  # (rows,) compute dtype
    weight: Tensor | None,  # (width,) or None
    needs_dx: bool,
    needs_dweight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Returns ``(dx, dweight)``; the math is in :func:`normlib.rms_norm.rms_norm_reference_backward`.

    With x_hat = x * rstd and wdy = gamma * dy, c1 = mean_j(x_hat * wdy) and
    dx = rstd * (wdy - x_hat * c1) = rstd * wdy - (rstd^3 * sum_j(x * wdy) / width) * x, the last
    form needing one row sum and no x_hat buffer.
    """
    rows, width = x.shape
    compute = rstd.dtype
    dx = torch.empty((rows, width), dtype=x.dtype) if needs_dx else None
    dweight = torch.zeros(width, dtype=compute) if needs_dweight else None
    if rows == 0 or width == 0:
        return dx, dweight
    gamma = None if weight is None else weight.reshape(width).to(compute)
    rstd_cubed = rstd * rstd * rstd / width  # (rows,): the per-row factor of sum_j(x * wdy)
    step = _rows_per_chunk(width, compute)
    m_max = min(step, rows)

    def buffer() -> Tensor:
        return torch.empty((m_max, width), dtype=compute)

    x_buffer = buffer() if x.dtype != compute else None
    dy_buffer = buffer() if dy.dtype != compute else None
    product = buffer()  # dy * x for dweight, then x * wdy for c1
    wdy_buffer = buffer() if gamma is not None else None
    dx_buffer = buffer() if needs_dx and dx.dtype != compute else None
    row_sum = torch.empty(m_max, dtype=compute)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        m = stop - start
        x_chunk = x[start:stop] if x_buffer is None else x_buffer[:m].copy_(x[start:stop])
        dy_chunk = dy[start:stop] if dy_buffer is None else dy_buffer[:m].copy_(dy[start:stop])
        r = rstd[start:stop]  # (m,)
        if dweight is not None:
            # dweight += sum_i rstd_i * dy_ij * x_ij: the row sum and the rstd scaling in one gemv
            torch.mul(dy_chunk, x_chunk, out=product[:m])
            dweight.addmv_(product[:m].T, r)
        if dx is None:
            continue
        wdy = dy_chunk if gamma is None else torch.mul(dy_chunk, gamma, out=wdy_buffer[:m])
        torch.mul(x_chunk, wdy, out=product[:m])
        coefficient = torch.sum(product[:m], dim=-1, out=row_sum[:m]).mul_(rstd_cubed[start:stop])
        dx_chunk = dx[start:stop] if dx_buffer is None else dx_buffer[:m]
        torch.mul(wdy, r.unsqueeze(1), out=dx_chunk)
        dx_chunk.addcmul_(x_chunk, coefficient.unsqueeze(1), value=-1.0)
        if dh is not None:
            dx_chunk.add_(dh[start:stop])
        if dx_buffer is not None:
            dx[start:stop].copy_(dx_chunk)
    return dx, dweight
