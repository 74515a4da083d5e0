"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016): statistics per sample and channel.

Each channel of each sample is standardized over its own spatial positions only, which removes
per-image contrast and color statistics; style transfer is where it came from. It is GroupNorm
with one channel per group, and by default has neither affine parameters nor running statistics
(torch.nn.InstanceNorm's defaults, kept here).

This file holds, in reading order: the NumPy reference (forward and backward), the functional op
``instance_norm`` (``torch.nn.functional.instance_norm``'s signature plus ``backend``) and the
modules ``InstanceNorm1d`` / ``InstanceNorm2d`` / ``InstanceNorm3d`` (drop-ins for their ``torch.nn``
twins). A negative ``eps`` is a ValueError, where torch would return NaN: a deliberate difference.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlib._checks import check_eps, check_input, check_running_stats, check_tensor_like_input
from normlib.backends import resolve
from normlib.batch_norm import _NormBase
from normlib.layer_norm import LayerNormCache, layer_norm_reference_backward

__all__ = [
    "InstanceNormCache",
    "instance_norm_reference",
    "instance_norm_reference_backward",
    "instance_norm",
    "instance_norm_torch",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class InstanceNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    mean: np.ndarray  # (N, C, 1, ...) from the input, or (1, C, 1, ...) from running_mean
    var: np.ndarray  # same shape as mean; biased variance when from the input
    rstd: np.ndarray  # same shape as mean
    x_hat: np.ndarray  # (N, C, *spatial) the standardized input
    use_input_stats: bool  # whether mean/var came from the input (the backward differs)
    running_mean: np.ndarray | None  # (C,) running_mean after this step (a new array)
    running_var: np.ndarray | None  # (C,) running_var after this step (a new array)


def instance_norm_reference(
    x: np.ndarray,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, InstanceNormCache]:
    r"""Instance normalization in float64 NumPy, written to be read next to its equations.

    For sample n and channel c, over its m = prod(spatial) positions i:

    .. math::

        \mathrm{mean}_{n,c} = \frac{1}{m}\sum_i x_{n,c,i}, \qquad
        \mathrm{var}_{n,c} = \frac{1}{m}\sum_i (x_{n,c,i} - \mathrm{mean}_{n,c})^2, \qquad
        \mathrm{rstd}_{n,c} = \frac{1}{\sqrt{\mathrm{var}_{n,c} + \varepsilon}}

    .. math::

        \hat{x}_{n,c,i} = (x_{n,c,i} - \mathrm{mean}_{n,c})\,\mathrm{rstd}_{n,c}, \qquad
        y_{n,c,i} = \gamma_c \hat{x}_{n,c,i} + \beta_c

    Running statistics, when given, follow PyTorch: each step moves them with weight ``momentum``
    towards the batch average of the per-instance means and unbiased (m / (m - 1)) variances.
    With ``use_input_stats=False`` the running statistics normalize instead. Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    per_channel = (1, c) + (1,) * (x.ndim - 2)  # broadcasts a (C,) vector against (N, C, *spatial)
    spatial_axes = tuple(range(2, x.ndim))
    new_running_mean = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    new_running_var = None if running_var is None else np.array(running_var, dtype=np.float64)
    if use_input_stats:
        mean = x.mean(axis=spatial_axes, keepdims=True)  # (N, C, 1, ...)
        # Two passes (mean first, then squared deviations): stable when |mean| >> std.
        var = ((x - mean) ** 2).mean(axis=spatial_axes, keepdims=True)  # (N, C, 1, ...)
        if new_running_mean is not None:
            m = math.prod(x.shape[2:])
            batch_mean = mean.reshape(n, c).mean(axis=0)  # (C,)
            batch_unbiased_var = (var * m / (m - 1)).reshape(n, c).mean(axis=0)  # (C,)
            new_running_mean = (1 - momentum) * new_running_mean + momentum * batch_mean
            new_running_var = (1 - momentum) * new_running_var + momentum * batch_unbiased_var
    else:
        mean = np.asarray(running_mean, dtype=np.float64).reshape(per_channel)  # (1, C, 1, ...)
        var = np.asarray(running_var, dtype=np.float64).reshape(per_channel)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * rstd  # (N, C, *spatial)
    y = x_hat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(per_channel)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(per_channel)
    cache = InstanceNormCache(mean, var, rstd, x_hat, use_input_stats, new_running_mean, new_running_var)
    return y, cache


def instance_norm_reference_backward(
    dy: np.ndarray, cache: InstanceNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`instance_norm_reference`, given dL/dy = ``dy``.

    With the input's own statistics, no new derivation: fold the per-channel weight into
    wdy = gamma * dy, view it as (N, C, m) rows and apply LayerNorm's backward
    (:func:`normlib.layer_norm.layer_norm_reference_backward`). With running statistics they are
    constants and dx = rstd * wdy.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat = cache.x_hat
    n, c = x_hat.shape[:2]
    per_channel = (1, c) + (1,) * (x_hat.ndim - 2)
    not_channel = (0,) + tuple(range(2, x_hat.ndim))
    dweight = (dy * x_hat).sum(axis=not_channel)  # (C,)
    dbias = dy.sum(axis=not_channel)  # (C,)
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64).reshape(per_channel)
    if not cache.use_input_stats:
        return wdy * cache.rstd, dweight, dbias
    rows = LayerNormCache(
        cache.mean.reshape(n, c, 1), cache.rstd.reshape(n, c, 1), x_hat.reshape(n, c, -1), axes=(2,)
    )
    dx_rows, _, _ = layer_norm_reference_backward(wdy.reshape(n, c, -1), rows)  # (N, C, m)
    return dx_rows.reshape(x_hat.shape), dweight, dbias


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    *,
    backend: str = "auto",
) -> Tensor:
    """Instance normalization of ``input``, ``(N, C, *spatial)``; see :func:`instance_norm_reference`.

    Same arguments and behaviour as :func:`torch.nn.functional.instance_norm` (including the
    in-place update of the running statistics when ``use_input_stats``); ``backend`` picks the
    implementation (see :mod:`normlib.backends`).
    """
    check_input(input, 3, "(N, C, *spatial)")
    channels = (input.shape[1],)
    check_running_stats(running_mean, running_var, input, use_batch_stats=use_input_stats)
    check_tensor_like_input(weight, "weight", input, channels)
    check_tensor_like_input(bias, "bias", input, channels)
    check_eps(eps)
    instances = input.shape[0] * input.shape[1]
    if use_input_stats and input.numel() == instances != 0:  # prod(spatial) == 1, without slicing shape
        raise ValueError(
            f"instance_norm with use_input_stats=True needs more than one spatial position per "
            f"channel, got input of shape {tuple(input.shape)}"
        )
    return resolve("instance_norm", backend, input)(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )


def instance_norm_torch(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """The "torch" backend. PyTorch runs instance norm as batch norm on a contiguous
    (1, N * C, *spatial) view, so its float32 statistics and stable variance carry over."""
    return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _InstanceNorm(_NormBase):
    """Instance normalization's bookkeeping, mirroring torch.nn.modules.instancenorm._InstanceNorm.

    Unlike BatchNorm: defaults affine=False and track_running_stats=False, num_batches_tracked is
    never incremented, momentum=None means 0 (no update), and input without a batch dimension is
    accepted and treated as a batch of one.
    """

    _no_batch_dim: int  # the input rank that means "no batch dimension"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, backend=backend
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._no_batch_dim
        if input.shape[feature_dim] != self.num_features:
            message = (
                f"expected input's size at dim={feature_dim} to match num_features="
                f"{self.num_features}, got input of shape {tuple(input.shape)}"
            )
            if self.affine:
                raise ValueError(message)
            # torch only warns here: without affine parameters nothing else depends on C.
            warnings.warn(message, stacklevel=2)
        unbatched = input.dim() == self._no_batch_dim
        if unbatched:
            input = input.unsqueeze(0)  # (C, *spatial) -> (1, C, *spatial)
        output = instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            backend=self.backend,
        )
        return output.squeeze(0) if unbatched else output


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization for (N, C, L) or unbatched (C, L) input; a drop-in for nn.InstanceNorm1d."""

    _no_batch_dim = 2
    _torch_twin = nn.InstanceNorm1d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(
                f"InstanceNorm1d expects input of shape (N, C, L) or (C, L), got a {input.dim()}-D "
                f"input of shape {tuple(input.shape)}"
            )


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization for (N, C, H, W) or unbatched (C, H, W) input; a drop-in for nn.InstanceNorm2d."""

    _no_batch_dim = 3
    _torch_twin = nn.InstanceNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (3, 4):
            raise ValueError(
                f"InstanceNorm2d expects input of shape (N, C, H, W) or (C, H, W), got a "
                f"{input.dim()}-D input of shape {tuple(input.shape)}"
            )


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization for (N, C, D, H, W) or unbatched (C, D, H, W) input; a drop-in for nn.InstanceNorm3d."""

    _no_batch_dim = 4
    _torch_twin = nn.InstanceNorm3d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (4, 5):
            raise ValueError(
                f"InstanceNorm3d expects input of shape (N, C, D, H, W) or (C, D, H, W), got a "
                f"{input.dim()}-D input of shape {tuple(input.shape)}"
            )
