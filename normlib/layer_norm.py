"""Layer normalization (Ba, Kiros & Hinton, 2016): statistics per sample, over its features.

Each sample (each token, in a Transformer) is standardized with the mean and variance of its own
trailing ``normalized_shape`` elements, then scaled and shifted elementwise by a learned weight
(gamma) and bias (beta). No statistic crosses the batch, so training and evaluation compute the
same function and a batch of one is fine.

This file holds, in reading order: the NumPy reference (forward and backward), the functional ops
``layer_norm`` (``torch.nn.functional.layer_norm``'s signature plus ``backend``) and
``add_layer_norm`` (the residual add of a pre-norm Transformer block fused with the norm), and the
modules ``LayerNorm`` (a drop-in for ``torch.nn.LayerNorm``) and ``LayerNorm2d`` (ConvNeXt's
channels-first variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlib._affine import register_affine, reset_affine
from normlib._autograd import scriptable_twin
from normlib._checks import (
    as_normalized_shape,
    check_backend_name,
    check_eps,
    check_input,
    check_normalized_shape,
    check_residual,
    check_size,
    check_tensor_like_input,
)
from normlib.backends import resolve

__all__ = [
    "LayerNormCache",
    "layer_norm_reference",
    "layer_norm_reference_backward",
    "add_layer_norm_reference",
    "add_layer_norm_reference_backward",
    "layer_norm",
    "layer_norm_torch",
    "add_layer_norm",
    "add_layer_norm_torch",
    "LayerNorm",
    "LayerNorm2d",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class LayerNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs.

    ``mean`` and ``rstd`` keep the reduced axes with size 1, ``(*leading, 1, ..., 1)``, so that they
    broadcast against x; this is also the shape of the mean and rstd that torch.native_layer_norm
    returns.
    """

    mean: np.ndarray
    rstd: np.ndarray
    x_hat: np.ndarray
    axes: tuple[int, ...]  # the normalized (trailing) axes of x


def layer_norm_reference(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, LayerNormCache]:
    r"""Layer normalization in float64 NumPy, written to be read next to its equations.

    Every row -- the trailing ``normalized_shape`` elements x_1..x_m of one sample -- is
    standardized on its own:

    .. math::

        \mathrm{mean} = \frac{1}{m}\sum_{j=1}^{m} x_j, \qquad
        \mathrm{var} = \frac{1}{m}\sum_{j=1}^{m} (x_j - \mathrm{mean})^2, \qquad
        \mathrm{rstd} = \frac{1}{\sqrt{\mathrm{var} + \varepsilon}}

    .. math::

        \hat{x}_j = (x_j - \mathrm{mean})\,\mathrm{rstd}, \qquad
        y_j = \gamma_j \hat{x}_j + \beta_j

    with gamma = ``weight`` and beta = ``bias``, both of shape ``normalized_shape`` (absent: 1 and 0).
    var is the biased (divide by n) variance. Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))  # the trailing, normalized axes
    mean = x.mean(axis=axes, keepdims=True)  # (*leading, 1, ..., 1)
    # Two passes: subtract the mean, then square. E[x^2] - E[x]^2 cancels catastrophically when
    # |mean| >> std (an fp32 row of 1e4 + N(0, 1) would get a variance of pure rounding noise).
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)  # (*leading, 1, ..., 1)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * rstd  # (*leading, *normalized_shape)
    y = x_hat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y, LayerNormCache(mean, rstd, x_hat, axes)


def layer_norm_reference_backward(
    dy: np.ndarray, cache: LayerNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dweight, dbias)`` of :func:`layer_norm_reference`, given dL/dy = ``dy``.

    dweight = sum over rows of dy * x_hat and dbias = sum over rows of dy. For dx, write
    wdy = gamma * dy; mean and rstd depend on every x of the row, and differentiating through them
    gives (c1, c2 as in Triton's layer-norm tutorial, means taken over the m elements of a row):

    .. math::

        c_1 = \frac{1}{m}\sum_j \hat{x}_j\, wdy_j, \qquad
        c_2 = \frac{1}{m}\sum_j wdy_j, \qquad
        dx_j = \mathrm{rstd}\,(wdy_j - (\hat{x}_j c_1 + c_2))

    Subtracting c2 removes the component of the gradient that would only shift the row (the mean
    undoes a shift); subtracting x_hat * c1 removes the one that would only rescale it (rstd undoes
    a scale). GroupNorm and InstanceNorm reuse this function on a reshaped view.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat, rstd, row_axes = cache.x_hat, cache.rstd, cache.axes  # row_axes: within one row
    batch_axes = tuple(range(row_axes[0]))  # across rows, for the parameter gradients
    dweight = (dy * x_hat).sum(axis=batch_axes)  # normalized_shape
    dbias = dy.sum(axis=batch_axes)  # normalized_shape
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64)
    c1 = (x_hat * wdy).mean(axis=row_axes, keepdims=True)  # (*leading, 1, ..., 1)
    c2 = wdy.mean(axis=row_axes, keepdims=True)  # (*leading, 1, ..., 1)
    dx = (wdy - (x_hat * c1 + c2)) * rstd
    return dx, dweight, dbias


def add_layer_norm_reference(
    x: np.ndarray,
    residual: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, LayerNormCache]:
    """The pre-norm residual step h = x + residual, y = layer_norm(h): returns ``(y, h, cache)``."""
    h = np.asarray(x, dtype=np.float64) + np.asarray(residual, dtype=np.float64)
    y, cache = layer_norm_reference(h, normalized_shape, weight, bias, eps)
    return y, h, cache


def add_layer_norm_reference_backward(
    dy: np.ndarray,
    dh: np.ndarray | None,
    cache: LayerNormCache,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dresidual, dweight, dbias)`` of :func:`add_layer_norm_reference`.

    h feeds both outputs, so its gradient is the norm's dx plus ``dh`` (the gradient arriving on
    the returned h, None if h was not used); x and residual both receive it unchanged.
    """
    dx, dweight, dbias = layer_norm_reference_backward(dy, cache, weight)
    if dh is not None:
        dx = dx + np.asarray(dh, dtype=np.float64)
    return dx, dx.copy(), dweight, dbias


# ----------------------------------------------------------------------------------------------
# Functional ops
# ----------------------------------------------------------------------------------------------


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-05,
    *,
    backend: str = "auto",
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims; see :func:`layer_norm_reference`.

    Same arguments and result as :func:`torch.nn.functional.layer_norm`; ``backend`` picks the
    implementation (see :mod:`normlib.backends`), which receives ``normalized_shape`` as a tuple.
    One deliberate difference: a negative ``eps`` is a ValueError, where torch returns NaN for rows
    whose variance is below -eps.
    """
    check_input(input, 1, "(*, *normalized_shape)")
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    check_tensor_like_input(bias, "bias", input, shape)
    check_eps(eps)
    return resolve("layer_norm", backend, input, weight, bias)(input, shape, weight, bias, eps)


def layer_norm_torch(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """The "torch" backend. PyTorch's kernels compute float16/bfloat16 statistics in float32 with a
    stable (Welford-style) variance, so nothing needs upcasting here."""
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-05,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The pre-norm Transformer step ``h = input + residual; y = layer_norm(h)``, returning ``(y, h)``.

    h is the new residual stream (the next block adds to it) and y what the block's sublayer reads.
    Fusing the two saves a full read and write of h; ``residual`` must match ``input`` in shape,
    dtype and device. No torch.nn.functional twin exists; the "torch" backend is the unfused pair.
    """
    check_input(input, 1, "(*, *normalized_shape)")
    check_residual(residual, input)
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    check_tensor_like_input(bias, "bias", input, shape)
    check_eps(eps)
    return resolve("add_layer_norm", backend, input, weight, bias)(input, residual, shape, weight, bias, eps)


def add_layer_norm_torch(
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The "torch" backend: the unfused add then layer_norm (h rounded to input's dtype in between,
    exactly what an unfused model computes)."""
    h = input + residual
    return F.layer_norm(h, normalized_shape, weight, bias, eps), h


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """A drop-in for torch.nn.LayerNorm whose math runs through :func:`layer_norm` and its backends."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.normalized_shape = as_normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        register_affine(self, self.normalized_shape, affine=elementwise_affine, bias=bias, factory_kwargs=factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles torch.nn.LayerNorm holding these parameters (see normlib._autograd)."""
        twin = nn.LayerNorm(self.normalized_shape, self.eps, self.elementwise_affine, bias=self.bias is not None, device="meta")
        return scriptable_twin(self, twin)

    def extra_repr(self) -> str:
        text = (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm (Liu et al., 2022): for an (N, C, H, W) map, normalize
    the C channels at each of the N * H * W positions separately.

    This is not torch.nn.LayerNorm([C, H, W]), which pools statistics over the whole map (the
    statistics of GroupNorm(1, C)): here every pixel's channel vector is standardized on its own,
    as LayerNorm does for every token of a sequence. eps defaults to 1e-6, ConvNeXt's value.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_channels = num_channels = check_size(num_channels, "num_channels")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        register_affine(self, num_channels, affine=elementwise_affine, bias=bias, factory_kwargs=factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d expects input of shape (N, C, H, W) with C = num_channels = "
                f"{self.num_channels}, got shape {tuple(input.shape)}"
            )
        channels_last = input.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        y = layer_norm(channels_last, (self.num_channels,), self.weight, self.bias, self.eps, backend=self.backend)
        return y.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            "torch.jit.script cannot compile LayerNorm2d: it has no torch.nn twin, and TorchScript cannot "
            "compile normlib's dispatch to backends; use torch.jit.trace or torch.compile"
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
