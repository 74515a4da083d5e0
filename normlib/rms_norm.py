"""RMSNorm (Zhang & Sennrich, 2019): LayerNorm without the mean.

Each row is divided by its root mean square and scaled by a learned weight (gamma). There is no
re-centering and no bias: the paper's argument is that LayerNorm's benefit comes from the
re-scaling, and dropping the mean saves a reduction. Llama-style Transformers use it.

Conventions, stated once (sources differ): epsilon goes *inside* the square root,
x / sqrt(mean(x^2) + eps), as in torch.nn.RMSNorm and Meta's Llama code (other implementations
write x / (RMS(x) + eps), which differs for rows whose RMS is not much larger than eps); there is no learned shift beta; and
``eps=None`` means what it means in torch.nn.RMSNorm (PyTorch >= 2.x docs): the machine epsilon of
the computation dtype, ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 inputs
and ``torch.finfo(torch.float64).eps`` for float64.

This file holds, in reading order: the NumPy reference (forward and backward), the functional ops
``rms_norm`` (``torch.nn.functional.rms_norm``'s signature plus ``backend``) and ``add_rms_norm``
(the pre-norm residual add fused with the norm), and the module ``RMSNorm`` (a drop-in for
``torch.nn.RMSNorm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlib._checks import (
    RMS_NORM_DEFAULT_EPS,
    check_backend_name,
    check_eps,
    check_input,
    check_normalized_shape,
    check_residual,
    check_tensor_like_input,
)
from normlib.backends import resolve

__all__ = [
    "RMSNormCache",
    "rms_norm_reference",
    "rms_norm_reference_backward",
    "add_rms_norm_reference",
    "add_rms_norm_reference_backward",
    "rms_norm",
    "rms_norm_torch",
    "add_rms_norm",
    "add_rms_norm_torch",
    "RMSNorm",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class RMSNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    rstd: np.ndarray  # (*leading, 1, ..., 1): 1 / sqrt(mean(x^2) + eps), reduced axes kept
    x_hat: np.ndarray  # (*leading, *normalized_shape): x * rstd
    axes: tuple[int, ...]  # the normalized (trailing) axes of x


def rms_norm_reference(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, RMSNormCache]:
    r"""RMSNorm in float64 NumPy, written to be read next to its equations.

    For every row x_1..x_m (the trailing ``normalized_shape`` elements of one sample):

    .. math::

        \mathrm{rstd} = \frac{1}{\sqrt{\frac{1}{m}\sum_{j=1}^{m} x_j^2 + \varepsilon}}, \qquad
        \hat{x}_j = x_j\,\mathrm{rstd}, \qquad
        y_j = \gamma_j \hat{x}_j

    with gamma = ``weight`` (absent: 1). The same rstd name as in LayerNorm: 1/RMS plays the role
    of 1/std, the mean being taken as 0. ``eps`` is a number here; the torch op's ``eps=None``
    depends on a dtype the reference does not have (see the module docstring).
    Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))  # the trailing, normalized axes
    mean_square = (x**2).mean(axis=axes, keepdims=True)  # (*leading, 1, ..., 1)
    rstd = 1.0 / np.sqrt(mean_square + eps)
    x_hat = x * rstd  # (*leading, *normalized_shape)
    y = x_hat if weight is None else x_hat * np.asarray(weight, dtype=np.float64)
    return y, RMSNormCache(rstd, x_hat, axes)


def rms_norm_reference_backward(
    dy: np.ndarray, cache: RMSNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dweight)`` of :func:`rms_norm_reference`, given dL/dy = ``dy``.

    dweight = sum over rows of dy * x_hat. For dx, write wdy = gamma * dy; rstd depends on every x
    of the row (d rstd / d x_j = -rstd^3 x_j / m), which gives LayerNorm's form without its c2
    term (there is no mean to differentiate through):

    .. math::

        c_1 = \frac{1}{m}\sum_j \hat{x}_j\, wdy_j, \qquad
        dx_j = \mathrm{rstd}\,(wdy_j - \hat{x}_j c_1)

    Subtracting x_hat * c1 removes the component of the gradient along x itself: scaling a row by
    a positive factor leaves its output (nearly, up to eps) unchanged.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat, rstd, row_axes = cache.x_hat, cache.rstd, cache.axes  # row_axes: within one row
    batch_axes = tuple(range(row_axes[0]))  # across rows, for the weight gradient
    dweight = (dy * x_hat).sum(axis=batch_axes)  # normalized_shape
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64)
    c1 = (x_hat * wdy).mean(axis=row_axes, keepdims=True)  # (*leading, 1, ..., 1)
    dx = (wdy - x_hat * c1) * rstd
    return dx, dweight


def add_rms_norm_reference(
    x: np.ndarray,
    residual: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, RMSNormCache]:
    """The pre-norm residual step h = x + residual, y = rms_norm(h): returns ``(y, h, cache)``."""
    h = np.asarray(x, dtype=np.float64) + np.asarray(residual, dtype=np.float64)
    y, cache = rms_norm_reference(h, normalized_shape, weight, eps)
    return y, h, cache


def add_rms_norm_reference_backward(
    dy: np.ndarray,
    dh: np.ndarray | None,
    cache: RMSNormCache,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dresidual, dweight)`` of :func:`add_rms_norm_reference`.

    h feeds both outputs, so its gradient is the norm's dx plus ``dh`` (the gradient arriving on
    the returned h, None if h was not used); x and residual both receive it unchanged.
    """
    dx, dweight = rms_norm_reference_backward(dy, cache, weight)
    if dh is not None:
        dx = dx + np.asarray(dh, dtype=np.float64)
    return dx, dx.copy(), dweight


# ----------------------------------------------------------------------------------------------
# Functional ops
# ----------------------------------------------------------------------------------------------


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims; see :func:`rms_norm_reference` for the math.

    Same arguments and result as :func:`torch.nn.functional.rms_norm`; ``eps=None`` is the float32
    machine epsilon (float64's for float64 input), as in torch. ``backend`` picks the implementation (see
    :mod:`normlib.backends`), which receives ``normalized_shape`` as a tuple and ``eps`` as a float.
    """
    check_input(input, 1, "(*, *normalized_shape)")
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    if eps is None:
        eps = RMS_NORM_DEFAULT_EPS[input.dtype]
    else:
        check_eps(eps)
    return resolve("rms_norm", backend, input.device)(input, shape, weight, eps)


def rms_norm_torch(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
) -> Tensor:
    """The "torch" backend. PyTorch's rms_norm computes float16/bfloat16 inputs in float32 and
    rounds the result back, so nothing needs upcasting here."""
    return F.rms_norm(input, normalized_shape, weight, eps)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The pre-norm Transformer step ``h = input + residual; y = rms_norm(h)``, returning ``(y, h)``.

    h is the new residual stream and y what the block's sublayer reads; fusing saves a full read
    and write of h. ``residual`` must match ``input`` in shape, dtype and device. No
    torch.nn.functional twin exists; the "torch" backend is the unfused pair.
    """
    check_input(input, 1, "(*, *normalized_shape)")
    check_residual(residual, input)
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    if eps is None:
        eps = RMS_NORM_DEFAULT_EPS[input.dtype]
    else:
        check_eps(eps)
    return resolve("add_rms_norm", backend, input.device)(input, residual, shape, weight, eps)


def add_rms_norm_torch(
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The "torch" backend: the unfused add then rms_norm (h rounded to input's dtype in between,
    exactly what an unfused model computes)."""
    h = input + residual
    return F.rms_norm(h, normalized_shape, weight, eps), h


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """A drop-in for torch.nn.RMSNorm whose math runs through :func:`rms_norm` and its backends."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
