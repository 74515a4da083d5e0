"""Dynamic Tanh (Zhu et al., 2025): an element-wise stand-in for LayerNorm and RMSNorm.

``DyT(x) = gamma * tanh(alpha * x) + beta``, with one learnable scalar alpha for the whole layer and
a per-feature gamma and beta as in LayerNorm. There are no statistics: every element is squashed on
its own, so DyT costs no reduction, does not depend on the other features of the token or on the
other samples of the batch, and is not invariant to the scale of its input -- alpha has to learn
the scale that normalization would have measured. Zhu et al. motivate it by the S-shaped curves
that trained LayerNorms trace when their outputs are plotted against their inputs; they initialize
alpha to 0.5 for non-LLM models (``alpha_init``), gamma to ones and beta to zeros.

Conventions: ``weight`` (gamma) and ``bias`` (beta) have the shape of the trailing dimensions of the
input they scale (usually ``(C,)``); alpha is a tensor with one element (shape ``()`` or ``(1,)``, the
paper's code uses ``(1,)``) or a Python float. float16/bfloat16 inputs are computed in float32.

This file holds, in reading order: the NumPy reference (forward and backward), the functional op
``dyt`` (with ``backend``) and the module ``DyT``, a drop-in where a ``LayerNorm(C)`` was.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from normlib._checks import FLOAT_DTYPES, check_backend_name, check_input
from normlib.backends import resolve

__all__ = ["DyTCache", "dyt_reference", "dyt_reference_backward", "dyt", "dyt_torch", "DyT"]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class DyTCache(NamedTuple):
    """What the forward pass computed that the backward pass needs."""

    x: np.ndarray  # the input, float64
    tanh: np.ndarray  # tanh(alpha * x), same shape
    param_axes: int  # how many trailing axes gamma and beta cover (0: no gamma, no beta)


def dyt_reference(
    x: np.ndarray,
    alpha: float,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, DyTCache]:
    r"""DyT in float64 NumPy, written to be read next to its equation.

    For every element x_j (j runs over the features of gamma and beta, broadcast over the rest):

    .. math::

        y_j = \gamma_j \tanh(\alpha x_j) + \beta_j

    with gamma = ``weight`` (absent: 1) and beta = ``bias`` (absent: 0). Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.tanh(float(alpha) * x)
    y = t if weight is None else t * np.asarray(weight, dtype=np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    param = weight if weight is not None else bias
    return y, DyTCache(x, t, 0 if param is None else np.ndim(param))


def dyt_reference_backward(
    dy: np.ndarray, cache: DyTCache, alpha: float, weight: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dalpha, dweight, dbias)`` of :func:`dyt_reference`, given dL/dy = ``dy``.

    With t = tanh(alpha x) and d tanh(u)/du = 1 - tanh(u)^2:

    .. math::

        dx_j = dy_j\,\gamma_j\,\alpha\,(1 - t_j^2), \qquad
        d\alpha = \sum_{\text{all elements}} dy_j\,\gamma_j\,x_j\,(1 - t_j^2), \\
        d\gamma_j = \sum_{\text{rows}} dy_j\,t_j, \qquad
        d\beta_j = \sum_{\text{rows}} dy_j

    alpha is shared by every element of every row, so its gradient sums over all of them; gamma and
    beta are per feature, so theirs sum over the rows (the leading axes). dweight and dbias are
    returned over the trailing ``cache.param_axes`` axes (whether or not the forward had them).
    """
    dy = np.asarray(dy, dtype=np.float64)
    x, t = cache.x, cache.tanh
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64)
    slope = 1.0 - t**2  # d tanh(u)/du at u = alpha x
    dx = wdy * float(alpha) * slope
    dalpha = float((wdy * x * slope).sum())
    row_axes = tuple(range(x.ndim - cache.param_axes))  # the leading axes, across rows
    return dx, dalpha, (dy * t).sum(axis=row_axes), dy.sum(axis=row_axes)


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def _check_alpha(alpha: Tensor | float, input: Tensor) -> Tensor:
    """alpha as a one-element tensor on input's device (a Python float becomes one)."""
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return torch.tensor(float(alpha), dtype=dtype, device=input.device)
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a torch.Tensor with one element or a float, got {type(alpha).__name__}")
    if alpha.dtype not in FLOAT_DTYPES:
        raise TypeError(f"alpha must be a floating-point tensor, got dtype {alpha.dtype}")
    if alpha.numel() != 1 or alpha.dim() > 1:
        raise ValueError(
            f"alpha must be a scalar: a tensor of shape () or (1,), got shape {tuple(alpha.shape)}"
        )
    if alpha.device != input.device:
        raise ValueError(
            f"alpha is on device {alpha.device} but input is on {input.device}; expected both on the same device"
        )
    return alpha


def _check_param(param: Tensor | None, name: str, input: Tensor) -> None:
    """weight or bias: None, or a float tensor on input's device equal to input's trailing dims."""
    if param is None:
        return
    if not isinstance(param, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
    if param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {param.dtype}")
    if param.device != input.device:
        raise ValueError(
            f"{name} is on device {param.device} but input is on {input.device}; expected both on the same device"
        )
    count = param.dim()
    if count == 0 or count > input.dim() or input.shape[-count:] != param.shape:
        raise ValueError(
            f"{name} must have the shape of the last dimension(s) of input {tuple(input.shape)}, "
            f"e.g. ({input.shape[-1]},), got {tuple(param.shape)}"
        )


def dyt(
    input: Tensor,
    alpha: Tensor | float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Dynamic Tanh, ``weight * tanh(alpha * input) + bias``; see :func:`dyt_reference` for the math.

    ``alpha`` is one scalar (a one-element tensor, trainable, or a float); ``weight`` and ``bias``
    have the shape of input's trailing dimension(s) and are optional. ``backend`` picks the
    implementation (see :mod:`normlib.backends`), which receives alpha as a tensor.
    """
    check_input(input, 1, "(*, C)")
    alpha = _check_alpha(alpha, input)
    _check_param(weight, "weight", input)
    _check_param(bias, "bias", input)
    if weight is not None and bias is not None and weight.shape != bias.shape:
        raise ValueError(
            f"weight and bias must have the same shape, got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return resolve("dyt", backend, input)(input, alpha, weight, bias)


def dyt_torch(input: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The "torch" backend: the three element-wise ops, in float32 for float16/bfloat16 inputs (so
    that alpha's gradient, a sum over every element, is accumulated in float32)."""
    compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    y = torch.tanh(alpha.to(compute) * input.to(compute))
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(input.dtype)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class DyT(nn.Module):
    """Dynamic Tanh as a drop-in for ``LayerNorm(normalized_shape)`` or ``RMSNorm(normalized_shape)``.

    ``alpha`` is a learnable scalar initialized to ``alpha_init`` (0.5, the paper's value for models
    other than LLMs); ``weight`` (ones) and ``bias`` (zeros) are per feature, present when
    ``elementwise_affine`` (the bias only if ``bias`` too), as in ``torch.nn.LayerNorm``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
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
        if not self.normalized_shape or any(size < 1 for size in self.normalized_shape):
            raise ValueError(f"normalized_shape must be positive sizes, got {normalized_shape!r}")
        if not (isinstance(alpha_init, numbers.Real) and np.isfinite(alpha_init)):
            raise ValueError(f"alpha_init must be a finite number, got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return dyt(input, self.alpha, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, alpha_init={self.alpha_init}, elementwise_affine={self.elementwise_affine}"
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
