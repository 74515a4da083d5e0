"""normlib's fused CPU path: RMSNorm and the residual-add + norm ops at the cost of moving memory.

Why it exists. ``torch.nn.functional.rms_norm`` on the CPU is a chain of separate ops (square,
mean, add, rsqrt, multiply, multiply by the weight), each a full pass that writes a full-size
temporary, so it costs about three times ``F.layer_norm``, which is one fused kernel. The backward
of the chain is worse still. And "h = x + residual; norm(h)" in PyTorch writes h and reads it
back, and adds the two gradients of h in a pass of its own.

What runs (the functions at the end of each section are the "cpu" backend's entries in
:data:`normlib.backends.IMPLEMENTATIONS`, which also says which inputs each one takes; nothing here
chooses between them):

``rms_norm.c`` and ``layer_norm.c`` (built and called by :mod:`normlib.cpu.native`)
    C kernels compiled on first use into Python extensions: each row is read from memory once,
    its statistics computed in float32, and the output written once; the backward recomputes the
    row statistics instead of saving them. float32, bfloat16 and float16 (one dtype for input,
    weight and bias). Each file holds its norm's math for one row; ``_kernels.h`` holds the rest
    (the loops over rows, PyTorch's own OpenMP threads, the Python module, whose functions take
    their arguments by name).
:mod:`normlib.cpu.blocked`
    The RMSNorm fallback in plain PyTorch (no C compiler or Python headers, float64, or a weight
    whose dtype differs from the input's): rows in cache-sized blocks, no full-size temporaries.
    add_layer_norm's fallback is PyTorch's LayerNorm kernels and the add in one autograd node.

Plain LayerNorm is *not* replaced: PyTorch's CPU kernel is already one pass per direction.

Why these means (the measurements are in ``results/cpu/native_build_and_threads.json`` and
``results/cpu/blocked_chunk_bytes.json``; ``python -m normlib.bench --cpu-grid`` times the ops
against their PyTorch peers):

* PyTorch ops on cache-sized blocks of rows (:mod:`normlib.cpu.blocked`) remove the full-size
  temporaries but still make one pass per op, so they stay slower than F.layer_norm's one kernel.
* torch.compile and numba take seconds per kernel to compile, too long for a notebook's first call
  (and numba has no bfloat16); the C kernels compile in about a second once per machine and then
  load from a cache in milliseconds.
* On small tensors the kernel takes a few hundred nanoseconds and the rest is overhead, so the
  per-call Python path is kept short: a Python extension rather than ctypes, no saved statistics
  (one allocation less), the differentiable recomputation only when a graph of the backward is
  being built, and no reshaping for contiguous 2-D input.

All ops here take their arguments already checked by the public op (normlib/rms_norm.py,
normlib/layer_norm.py) and dispatched by normlib.backends, support any leading shape and non-contiguous inputs (copied to contiguous
rows first), and autograd to any order: the first derivative runs in the C kernels, and a backward
with ``create_graph=True`` (double backward: gradient penalties, Hessian-vector products)
recomputes the forward with PyTorch's ops and differentiates that, so higher derivatives are
PyTorch's own. Where no kernel can take part (torch.func's transforms, torch.jit.trace,
complex input) normlib.backends runs PyTorch's op instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from normlib._autograd import (
    add_norm_double_backward as _add_norm_double_backward,
    double_backward as _double_backward,
    rms_norm_composite as _rms_norm_composite,
)
from normlib.cpu import blocked, native

__all__ = [
    "rms_norm_c",
    "rms_norm_blocked",
    "add_rms_norm_c",
    "add_rms_norm_blocked",
    "add_layer_norm_c",
    "add_layer_norm_aten",
]


# ----------------------------------------------------------------------------------------------
# Shared bookkeeping
# ----------------------------------------------------------------------------------------------
# On a tensor of a few hundred elements every PyTorch call costs ~0.1-1 us, as much as the kernel
# itself, and PyTorch's own LayerNorm takes ~3 us in all: so the common case (contiguous rows, one
# normalized dimension, a weight of the input's dtype) takes a path with no views, conversions or
# extra allocations, and only the rest goes through the general reshaping below.


def _as_rows(tensor: Tensor | None, rows: int, width: int) -> Tensor | None:
    """(*leading, *normalized_shape) -> contiguous (rows, width): a view when possible, else a copy."""
    if tensor is None or (tensor.dim() == 2 and tensor.shape[1] == width and tensor.is_contiguous()):
        return tensor
    return tensor.reshape(rows, width).contiguous()


@lru_cache(maxsize=16)
def _filled(width: int, dtype: torch.dtype, value: float) -> Tensor:
    """gamma (ones) or beta (zeros) for an op without one; the kernels only read it."""
    return torch.full((width,), value, dtype=dtype)


def _vector(parameter: Tensor | None, width: int, dtype: torch.dtype, missing: float = 1.0) -> Tensor:
    """A weight or bias as the C kernels take it: a contiguous (width,) vector of the input's dtype."""
    if parameter is None:
        return _filled(width, dtype, missing)
    if parameter.dim() == 1 and parameter.is_contiguous():
        return parameter
    return parameter.reshape(width).contiguous()


def _needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether to build a graph node; inference calls skip autograd.Function's overhead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------
# RMSNorm and residual add + RMSNorm
# ----------------------------------------------------------------------------------------------


class _RowKernels(NamedTuple):
    """One way to compute RMSNorm over contiguous (rows, width) rows: the C kernels or blocked PyTorch."""

    # (x, residual or None, weight or None, eps) -> (y, h or None, rstd or None): rstd is None
    # where the backward recomputes it (the C kernels)
    forward: Callable[..., tuple[Tensor, Tensor | None, Tensor | None]]
    # (dy, dh or None, x, rstd, weight, eps, needs_dx, needs_dweight) -> (dx, dweight)
    backward: Callable[..., tuple[Tensor | None, Tensor | None]]


def _c_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None, None]:
    y, h = native.rms_norm_forward(x, residual, _vector(weight, x.shape[1], x.dtype), eps)
    return y, h, None


def _c_backward(
    dy: Tensor, dh: Tensor | None, x: Tensor, _rstd: None, weight: Tensor | None, eps: float,
    needs_dx: bool, needs_dweight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    return native.rms_norm_backward(dy, dh, x, _vector(weight, x.shape[1], x.dtype), eps, needs_dx, needs_dweight)


def _blocked_backward(
    dy: Tensor, dh: Tensor | None, x: Tensor, rstd: Tensor, weight: Tensor | None, _eps: float,
    needs_dx: bool, needs_dweight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    return blocked.backward(dy, dh, x, rstd, weight, needs_dx, needs_dweight)


C_KERNELS = _RowKernels(_c_forward, _c_backward)
BLOCKED = _RowKernels(blocked.forward, _blocked_backward)


def _rms_forward(
    kernels: _RowKernels,
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    shape: tuple[int, ...],
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Returns ``(y, h, normalized, rstd)``: y and h (None without a residual) shaped like the
    input, and what the backward needs: ``normalized`` (h, or the input) as contiguous
    (rows, width), and rstd (rows,) where the kernels' backward does not recompute it (else None)."""
    if len(shape) == 1 and input.dim() == 2 and input.is_contiguous() and (residual is None or residual.is_contiguous()):
        x, res, flat = input, residual, False
    else:
        x = _as_rows(input, math.prod(input.shape[: input.dim() - len(shape)]), math.prod(shape))
        res, flat = _as_rows(residual, *x.shape), True
    y, h, rstd = kernels.forward(x, res, weight, eps)
    normalized = x if h is None else h
    if flat:
        y = y.view(input.shape)
        h = None if h is None else h.view(input.shape)
    return y, h, normalized, rstd


def _rms_norm_forward(
    kernels: _RowKernels, input: Tensor, weight: Tensor | None, shape: tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """RMSNorm without a residual: ``(y, x as (rows, width), rstd)`` as in :func:`_rms_forward`.
    Contiguous 2-D input with a weight, the usual call, goes straight to the C kernel: on a single
    row the general path's bookkeeping costs a third of the op."""
    if (
        kernels is C_KERNELS
        and input.dim() == 2
        and len(shape) == 1
        and input.is_contiguous()
        and weight is not None
        and weight.is_contiguous()
    ):
        return native.rms_norm(input, weight, eps), input, None
    y, _, x, rstd = _rms_forward(kernels, input, None, weight, shape, eps)
    return y, x, rstd


def _rms_backward(
    ctx: FunctionCtx, dy: Tensor, dh: Tensor | None, needs_dx: bool, needs_dweight: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Returns ``(dx, dweight)`` shaped like the input and the weight (first derivatives only:
    the Functions' backward takes :func:`_double_backward` when create_graph=True)."""
    x, weight, rstd = ctx.saved_tensors[:3]
    rows, width = x.shape
    dy_rows, dh_rows = _as_rows(dy, rows, width), _as_rows(dh, rows, width)
    needs_dweight = needs_dweight and weight is not None
    dx, dweight = ctx.kernels.backward(dy_rows, dh_rows, x, rstd, weight, ctx.eps, needs_dx, needs_dweight)
    if dx is not None and dx.shape != dy.shape:
        dx = dx.view(dy.shape)
    if dweight is not None:
        if dweight.dtype != weight.dtype:
            dweight = dweight.to(weight.dtype)
        if dweight.shape != weight.shape:
            dweight = dweight.view(weight.shape)
    return dx, dweight


class _RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x) as one graph node, computed by ``kernels``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        weight: Tensor | None,
        shape: tuple[int, ...],
        eps: float,
        kernels: _RowKernels,
    ) -> Tensor:
        y, x, rstd = _rms_norm_forward(kernels, input, weight, shape, eps)
        # input itself too (no copy): a double backward recomputes from it (see _double_backward)
        ctx.save_for_backward(x, weight, rstd, input)
        ctx.eps, ctx.shape, ctx.kernels = eps, shape, kernels
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            _, weight, _, input = ctx.saved_tensors
            dx, dweight = _double_backward(
                lambda i, w: _rms_norm_composite(i, w, ctx.shape, ctx.eps), (input, weight), (dy,), needs[:2]
            )
        else:
            dx, dweight = _rms_backward(ctx, dy, None, needs[0], needs[1])
        return dx, dweight, None, None, None


class _AddRMSNormFunction(torch.autograd.Function):
    """(y, h) = (rms_norm(x + residual), x + residual) as one graph node, computed by ``kernels``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        residual: Tensor,
        weight: Tensor | None,
        shape: tuple[int, ...],
        eps: float,
        kernels: _RowKernels,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to add
        y, h, h_rows, rstd = _rms_forward(kernels, input, residual, weight, shape, eps)
        # the output h itself too (h_rows may be its base): a double backward differentiates at it
        ctx.save_for_backward(h_rows, weight, rstd, h)
        ctx.eps, ctx.shape, ctx.kernels = eps, shape, kernels
        return y, h

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True
            _, weight, _, h = ctx.saved_tensors
            dx, (dweight,) = _add_norm_double_backward(
                lambda h_, w: _rms_norm_composite(h_, w, ctx.shape, ctx.eps)[0], h, (weight,), dy, dh, (needs[2],)
            )
            return dx, dx, dweight, None, None, None
        if dy is None:  # only h was used downstream: the norm contributes nothing
            return dh, dh, None, None, None, None
        dx, dweight = _rms_backward(ctx, dy, dh, needs[0] or needs[1], needs[2])
        # h = input + residual: both receive dL/dh unchanged (autograd copies before accumulating)
        return dx, dx, dweight, None, None, None


# The "cpu" backend's entries for rms_norm and add_rms_norm (see IMPLEMENTATIONS in
# normlib.backends, which says which inputs each takes). Inference calls skip autograd.Function's
# overhead.


def rms_norm_c(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float) -> Tensor:
    """:func:`normlib.rms_norm` in the C kernels."""
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNormFunction.apply(input, weight, normalized_shape, eps, C_KERNELS)
    return _rms_norm_forward(C_KERNELS, input, weight, normalized_shape, eps)[0]


def rms_norm_blocked(input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float) -> Tensor:
    """:func:`normlib.rms_norm` in blocked PyTorch (:mod:`normlib.cpu.blocked`)."""
    if _needs_autograd(input, weight):
        return _RMSNormFunction.apply(input, weight, normalized_shape, eps, BLOCKED)
    return _rms_norm_forward(BLOCKED, input, weight, normalized_shape, eps)[0]


def _add_rms_norm(
    kernels: _RowKernels,
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    if _needs_autograd(input, residual, weight):
        return _AddRMSNormFunction.apply(input, residual, weight, normalized_shape, eps, kernels)
    y, h, _, _ = _rms_forward(kernels, input, residual, weight, normalized_shape, eps)
    return y, h


def add_rms_norm_c(
    input: Tensor, residual: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`normlib.add_rms_norm` in the C kernels: ``(rms_norm(h), h)`` with h = input + residual."""
    return _add_rms_norm(C_KERNELS, input, residual, normalized_shape, weight, eps)


def add_rms_norm_blocked(
    input: Tensor, residual: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`normlib.add_rms_norm` in blocked PyTorch."""
    return _add_rms_norm(BLOCKED, input, residual, normalized_shape, weight, eps)


# ----------------------------------------------------------------------------------------------
# Residual add + LayerNorm: the C kernels, else PyTorch's LayerNorm kernels in one graph node
# ----------------------------------------------------------------------------------------------


def _fused_add_layer_norm(
    input: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The C forward: ``(y, h)`` shaped like the input, and h as (rows, width) for the backward."""
    if len(shape) == 1 and input.dim() == 2 and input.is_contiguous() and residual.is_contiguous():
        x, res = input, residual
    else:
        x = _as_rows(input, math.prod(input.shape[: input.dim() - len(shape)]), math.prod(shape))
        res = _as_rows(residual, *x.shape)
    width, dtype = x.shape[1], x.dtype
    y, h = native.add_layer_norm_forward(x, res, _vector(weight, width, dtype), _vector(bias, width, dtype, 0.0), eps)
    if x is not input:
        return y.view(input.shape), h.view(input.shape), h
    return y, h, h


def _add_layer_norm_double_backward(
    ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None, h: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor | None, ...]:
    """create_graph=True: see :func:`normlib._autograd.add_norm_double_backward`."""
    dx, (dweight, dbias) = _add_norm_double_backward(
        lambda h_, w, b: F.layer_norm(h_, ctx.shape, w, b, ctx.eps), h, (weight, bias), dy, dh,
        ctx.needs_input_grad[2:4],
    )
    return dx, dx, dweight, dbias, None, None


def _fused_add_layer_norm_backward(ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():  # create_graph=True
        _, weight, bias, h = ctx.saved_tensors
        return _add_layer_norm_double_backward(ctx, dy, dh, h, weight, bias)
    if dy is None:  # only h was used downstream: the norm contributes nothing
        return dh, dh, None, None, None, None
    h, weight, bias = ctx.saved_tensors[:3]
    rows, width = h.shape
    needs = ctx.needs_input_grad
    needs_parameters = (weight is not None and needs[2]) or (bias is not None and needs[3])
    dx, dweight, dbias = native.add_layer_norm_backward(
        _as_rows(dy, rows, width), _as_rows(dh, rows, width), h, _vector(weight, width, h.dtype),
        ctx.eps, needs[0] or needs[1], needs_parameters,
    )
    if dx is not None and dx.shape != dy.shape:
        dx = dx.view(dy.shape)
    dweight = dweight.view(weight.shape) if weight is not None and needs[2] else None
    dbias = dbias.view(bias.shape) if bias is not None and needs[3] else None
    # h = input + residual: both receive the same gradient (autograd copies before accumulating)
    return dx, dx, dweight, dbias, None, None


class _FusedAddLayerNormFunction(torch.autograd.Function):
    """(y, h) = (layer_norm(x + residual), x + residual) as one graph node, in the C kernels."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        residual: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shape: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        y, h, h_rows = _fused_add_layer_norm(input, residual, weight, bias, shape, eps)
        ctx.save_for_backward(h_rows, weight, bias, h)  # h itself too, for a double backward
        ctx.eps, ctx.shape = eps, shape
        return y, h

    backward = staticmethod(_fused_add_layer_norm_backward)


def _add_contiguous(input: Tensor, residual: Tensor) -> Tensor:
    """h = input + residual, contiguous whatever the inputs' strides (native_layer_norm would copy it)."""
    return torch.add(input, residual, out=torch.empty(input.shape, dtype=input.dtype))


class _AddLayerNormFunction(torch.autograd.Function):
    """The fallback (float64, mixed dtypes, no C compiler): PyTorch's LayerNorm kernels and the add
    as one graph node, which adds the gradient arriving on h in place instead of in a new tensor."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        residual: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        shape: tuple[int, ...],
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        h = _add_contiguous(input, residual)
        y, mean, rstd = torch.native_layer_norm(h, shape, weight, bias, eps)
        ctx.save_for_backward(h, mean, rstd, weight, bias)
        ctx.shape, ctx.eps = shape, eps
        return y, h

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor | None, dh: Tensor | None) -> tuple[Tensor | None, ...]:
        h, mean, rstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _add_layer_norm_double_backward(ctx, dy, dh, h, weight, bias)
        if dy is None:
            return dh, dh, None, None, None, None
        output_mask = [
            ctx.needs_input_grad[0] or ctx.needs_input_grad[1],
            weight is not None and ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        ]
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy.contiguous(), h, ctx.shape, mean, rstd, weight, bias, output_mask
        )
        if dx is not None and dh is not None:
            dx.add_(dh)
        return dx, dx, dweight, dbias, None, None


def add_layer_norm_c(
    input: Tensor, residual: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """:func:`normlib.add_layer_norm` in the C kernels: ``(layer_norm(h), h)`` with h = input + residual."""
    if _needs_autograd(input, residual, weight, bias):
        return _FusedAddLayerNormFunction.apply(input, residual, weight, bias, normalized_shape, eps)
    return _fused_add_layer_norm(input, residual, weight, bias, normalized_shape, eps)[:2]


def add_layer_norm_aten(
    input: Tensor, residual: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """:func:`normlib.add_layer_norm` with PyTorch's LayerNorm kernels, the add in the same graph node."""
    if _needs_autograd(input, residual, weight, bias):
        return _AddLayerNormFunction.apply(input, residual, weight, bias, normalized_shape, eps)
    h = _add_contiguous(input, residual)
    y, _, _ = torch.native_layer_norm(h, normalized_shape, weight, bias, eps)
    return y, h
