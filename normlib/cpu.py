"""normlib's fused CPU path: RMSNorm and the residual-add + norm ops at the cost of moving memory.

Why this file exists. ``torch.nn.functional.rms_norm`` on the CPU is a chain of separate ops
(square, mean, add, rsqrt, multiply, multiply by the weight), and each op writes a full-size
temporary. On the machine this course was built on (2 cores, KVM) the dominant cost of a
full-size op is not reading memory but *first-touching freshly allocated output memory*: a
32 MiB ``x.clone()`` takes ~10 ms although reading the same 32 MiB (``torch.linalg.vector_norm``)
takes ~1 ms. Every full-size temporary of the unfused chain pays that page-fault toll again,
which is why F.rms_norm costs about three clones and F.layer_norm (one fused kernel, one output)
about one.

How. Pure PyTorch, *blocked*: rows are processed in chunks small enough to stay in the L2 cache
(see ``_CHUNK_BYTES``), every intermediate lives in a small scratch buffer reused from chunk to
chunk, and the only full-size allocations are the outputs themselves (y, and h for the residual
ops; dx in the backward). Alternatives considered, and why not:

* torch.compile: ~21 s of compilation in a fresh process (the CI starts from an empty cache),
  far over the 2 s a notebook may stall on a first call.
* numba or a C++ extension: a new dependency or a build step, and no native bfloat16 support;
  the blocked version already runs at the cost of LayerNorm's fused kernel (see the measurements
  in the final report of the CPU issue and in the RMSNorm chapter).

LayerNorm itself is *not* replaced: PyTorch's CPU kernel already makes one pass and writes only
its output. ``add_layer_norm_cpu`` only fuses the bookkeeping of the residual add around PyTorch's
own LayerNorm kernels (one autograd node, the gradient of h added in place).

Numerics: float16 and bfloat16 inputs are computed in float32 (statistics, normalization, the
weight gradient) and rounded once, at the end; float64 is computed in float64.
Formulas and symbols (rstd, x_hat, c1) follow :func:`normlib.rms_norm.rms_norm_reference_backward`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["unavailable_reason", "rms_norm_cpu", "add_rms_norm_cpu", "add_layer_norm_cpu"]

# Bytes of one chunk of rows in the compute dtype. The backward keeps three chunk-sized float32
# buffers live (x, weight * dy, a product) and torch splits each op of a chunk over both cores,
# so 256 KiB per buffer keeps ~384 KiB per core, well inside the 1 MiB L2 of each core; larger
# chunks spilled to L3, smaller ones paid more per-op dispatch (measured, see the report).
_CHUNK_BYTES = 256 * 1024


def unavailable_reason() -> str | None:
    """None: the path is plain PyTorch and runs wherever PyTorch runs."""
    return None


# ----------------------------------------------------------------------------------------------
# Shared bookkeeping
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) is computed in float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _rows_per_chunk(width: int, dtype: torch.dtype) -> int:
    element_size = torch.finfo(dtype).bits // 8
    return max(1, _CHUNK_BYTES // (width * element_size))


def _as_rows(tensor: Tensor, rows: int, width: int) -> Tensor:
    """(*leading, *normalized_shape) -> (rows, width); a view when the strides allow, else a copy."""
    return tensor.reshape(rows, width)


def _row_count(tensor: Tensor, normalized_shape: tuple[int, ...]) -> tuple[int, int]:
    width = math.prod(normalized_shape)
    rows = math.prod(tensor.shape[: tensor.dim() - len(normalized_shape)])
    return rows, width


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether to build a graph node; inference calls skip autograd.Function's overhead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# RMSNorm: blocked forward and backward on (rows, width) views
# ----------------------------------------------------------------------------------------------


def _rms_forward(
    x: Tensor,  # (rows, width): the rows to normalize (or to add residual to first)
    residual: Tensor | None,  # (rows, width) or None: if given, h = x + residual is normalized
    weight: Tensor | None,  # (width,) gamma, or None
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Returns ``(y, h, rstd)``: y (rows, width), h (rows, width) or None, rstd (rows,) in the compute dtype."""
    rows, width = x.shape
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    compute = _compute_dtype(x.dtype, out_dtype)
    y = torch.empty((rows, width), dtype=out_dtype)
    h = None if residual is None else torch.empty((rows, width), dtype=x.dtype)
    rstd = torch.empty(rows, dtype=compute)
    if rows == 0 or width == 0:
        rstd.fill_(1.0 / math.sqrt(eps))
        return y, h, rstd
    gamma = None if weight is None else weight.reshape(width).to(compute)
    eps_tensor = torch.tensor(eps, dtype=compute)
    step = _rows_per_chunk(width, compute)
    # x in the compute dtype when it is not already (float16/bfloat16, or mixed with a float64 weight)
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


def _rms_backward(
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
        return dx, None if dweight is None else dweight.to(weight.dtype)
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
    return dx, None if dweight is None else dweight.to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x): one graph node whose backward is the blocked :func:`_rms_backward`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
    ) -> Tensor:
        rows, width = _row_count(input, normalized_shape)
        x = _as_rows(input, rows, width)
        y, _, rstd = _rms_forward(x, None, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y.view(input.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, rstd, weight = ctx.saved_tensors
        rows, width = x.shape
        dx, dweight = _rms_backward(
            dy.reshape(rows, width), None, x, rstd, weight,
            needs_dx=ctx.needs_input_grad[0], needs_dweight=ctx.needs_input_grad[1],
        )
        return (None if dx is None else dx.view(dy.shape)), dweight, None, None


class _AddRMSNormFunction(torch.autograd.Function):
    """(y, h) = (rms_norm(x + residual), x + residual) as one graph node."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        residual: Tensor,
        weight: Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to add
        rows, width = _row_count(input, normalized_shape)
        y, h, rstd = _rms_forward(_as_rows(input, rows, width), _as_rows(residual, rows, width), weight, eps)
        ctx.save_for_backward(h, rstd, weight)
        return y.view(input.shape), h.view(input.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
        h, rstd, weight = ctx.saved_tensors
        rows, width = h.shape
        needs_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if dy is None:  # only h was used downstream: the norm contributes nothing
            return dh, dh, None, None, None
        shape = dy.shape
        dh_rows = None if dh is None else dh.reshape(rows, width)
        dx, dweight = _rms_backward(
            dy.reshape(rows, width), dh_rows, h, rstd, weight,
            needs_dx=needs_dx, needs_dweight=ctx.needs_input_grad[2],
        )
        dx = None if dx is None else dx.view(shape)
        # h = input + residual: both receive dL/dh unchanged (autograd copies before accumulating)
        return dx, dx, dweight, None, None


def rms_norm_cpu(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float | None,
) -> Tensor:
    """The "cpu" backend of :func:`normlib.rms_norm`; arguments already checked by the public op."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if _needs_autograd(input, weight):
        return _RMSNormFunction.apply(input, weight, normalized_shape, eps)
    rows, width = _row_count(input, normalized_shape)
    y, _, _ = _rms_forward(_as_rows(input, rows, width), None, weight, eps)
    return y.view(input.shape)


def add_rms_norm_cpu(
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float | None,
) -> tuple[Tensor, Tensor]:
    """The "cpu" backend of :func:`normlib.add_rms_norm`: returns ``(rms_norm(h), h)``, h = input + residual."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if _needs_autograd(input, residual, weight):
        return _AddRMSNormFunction.apply(input, residual, weight, normalized_shape, eps)
    rows, width = _row_count(input, normalized_shape)
    y, h, _ = _rms_forward(_as_rows(input, rows, width), _as_rows(residual, rows, width), weight, eps)
    return y.view(input.shape), h.view(input.shape)


# ----------------------------------------------------------------------------------------------
# Residual add + LayerNorm: PyTorch's fused LayerNorm kernels, one graph node around them
# ----------------------------------------------------------------------------------------------


class _AddLayerNormFunction(torch.autograd.Function):
    """(y, h) = (layer_norm(x + residual), x + residual) as one graph node.

    PyTorch's native_layer_norm already reads h once and writes y once, so the work is left to it;
    what this node saves over the unfused pair is an autograd node and, in the backward, a
    full-size temporary: dL/dh is added into the LayerNorm gradient in place.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        residual: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        # a contiguous h, whatever the inputs' strides: native_layer_norm would copy otherwise
        h = torch.add(input, residual, out=torch.empty(input.shape, dtype=input.dtype))
        y, mean, rstd = torch.native_layer_norm(h, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(h, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
        h, mean, rstd, weight, bias = ctx.saved_tensors
        if dy is None:
            return dh, dh, None, None, None, None
        needs_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        output_mask = [needs_dx, weight is not None and ctx.needs_input_grad[2],
                       bias is not None and ctx.needs_input_grad[3]]
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy.contiguous(), h, ctx.normalized_shape, mean, rstd, weight, bias, output_mask
        )
        if dx is not None and dh is not None:
            dx.add_(dh)
        return dx, dx, dweight, dbias, None, None


def add_layer_norm_cpu(
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The "cpu" backend of :func:`normlib.add_layer_norm`: returns ``(layer_norm(h), h)``, h = input + residual."""
    if _needs_autograd(input, residual, weight, bias):
        return _AddLayerNormFunction.apply(input, residual, weight, bias, normalized_shape, eps)
    h = torch.add(input, residual, out=torch.empty(input.shape, dtype=input.dtype))
    y, _, _ = torch.native_layer_norm(h, normalized_shape, weight, bias, eps)
    return y, h
