"""Group normalization (Wu & He, 2018): statistics per sample, over groups of channels.

The C channels of each sample are split into ``num_groups`` groups of C / num_groups consecutive
channels; each group is standardized with the mean and variance of its channels at all spatial
positions, then every channel is scaled and shifted by its own learned weight and bias. No
statistic crosses the batch, so it works at batch size 1 and trains and evaluates alike. The two
ends of the family: ``num_groups=1`` is LayerNorm over (C, H, W), ``num_groups=C`` is
InstanceNorm (with affine parameters).

This file holds, in reading order: the NumPy reference (forward and backward), the functional op
``group_norm`` (``torch.nn.functional.group_norm``'s signature plus ``backend``) and the module
``GroupNorm`` (a drop-in for ``torch.nn.GroupNorm``). A negative ``eps`` is a ValueError, where
torch would return NaN: a deliberate difference, as in every normlib norm.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlib._affine import register_affine, reset_affine
from normlib._autograd import scriptable_twin
from normlib._checks import check_backend_name, check_eps, check_input, check_size, check_tensor_like_input
from normlib.backends import resolve
from normlib.layer_norm import LayerNormCache, layer_norm_reference_backward

__all__ = [
    "GroupNormCache",
    "group_norm_reference",
    "group_norm_reference_backward",
    "group_norm",
    "group_norm_torch",
    "GroupNorm",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class GroupNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    mean: np.ndarray  # (N, G, 1) per sample and group
    rstd: np.ndarray  # (N, G, 1)
    x_hat: np.ndarray  # (N, C, *spatial) the standardized input, before the affine map
    num_groups: int


def group_norm_reference(
    x: np.ndarray,
    num_groups: int,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, GroupNormCache]:
    r"""Group normalization in float64 NumPy, written to be read next to its equations.

    For sample n and group g, let S be its C/G channels at all spatial positions (``|S|`` = m values):

    .. math::

        \mathrm{mean}_{n,g} = \frac{1}{m}\sum_{i \in S} x_i, \qquad
        \mathrm{var}_{n,g} = \frac{1}{m}\sum_{i \in S} (x_i - \mathrm{mean}_{n,g})^2, \qquad
        \mathrm{rstd}_{n,g} = \frac{1}{\sqrt{\mathrm{var}_{n,g} + \varepsilon}}

    .. math::

        \hat{x}_i = (x_i - \mathrm{mean}_{n,g})\,\mathrm{rstd}_{n,g}, \qquad
        y_{n,c,\ldots} = \gamma_c \hat{x}_{n,c,\ldots} + \beta_c

    Note the two granularities: statistics per (sample, group), affine parameters per channel.
    In code that is a LayerNorm over the last axis of an (N, G, C/G * prod(spatial)) view,
    followed by a per-channel affine map. Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    per_channel = (1, c) + (1,) * (x.ndim - 2)  # broadcasts a (C,) vector against (N, C, *spatial)
    groups = x.reshape(n, num_groups, -1)  # (N, G, C/G * prod(spatial))
    mean = groups.mean(axis=2, keepdims=True)  # (N, G, 1)
    # Two passes (mean first, then squared deviations): stable when |mean| >> std.
    var = ((groups - mean) ** 2).mean(axis=2, keepdims=True)  # (N, G, 1)
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = ((groups - mean) * rstd).reshape(x.shape)  # (N, C, *spatial)
    y = x_hat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(per_channel)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(per_channel)
    return y, GroupNormCache(mean, rstd, x_hat, num_groups)


def group_norm_reference_backward(
    dy: np.ndarray, cache: GroupNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`group_norm_reference`, given dL/dy = ``dy``.

    No new derivation: fold the per-channel weight into wdy = gamma * dy, view it as (N, G, m) rows
    and apply LayerNorm's backward (:func:`normlib.layer_norm.layer_norm_reference_backward`),
    whose c1/c2 are then means over each group's m values. The parameter gradients are sums over
    every axis but the channel axis.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat = cache.x_hat
    n, c = x_hat.shape[:2]
    per_channel = (1, c) + (1,) * (x_hat.ndim - 2)
    not_channel = (0,) + tuple(range(2, x_hat.ndim))
    dweight = (dy * x_hat).sum(axis=not_channel)  # (C,)
    dbias = dy.sum(axis=not_channel)  # (C,)
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64).reshape(per_channel)
    rows = LayerNormCache(cache.mean, cache.rstd, x_hat.reshape(n, cache.num_groups, -1), axes=(2,))
    dx_rows, _, _ = layer_norm_reference_backward(wdy.reshape(n, cache.num_groups, -1), rows)
    return dx_rows.reshape(x_hat.shape), dweight, dbias


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-05,
    *,
    backend: str = "auto",
) -> Tensor:
    """Group normalization of ``input``, ``(N, C, *spatial)``; see :func:`group_norm_reference` for the math.

    Same arguments and result as :func:`torch.nn.functional.group_norm`; ``backend`` picks the
    implementation (see :mod:`normlib.backends`).
    """
    check_input(input, 2, "(N, C, *spatial)")
    channels = input.shape[1]
    num_groups = check_size(num_groups, "num_groups", positive=True)  # NumPy integers too, as in torch
    if channels % num_groups:
        raise ValueError(
            f"the number of channels C = input.shape[1] = {channels} must be divisible by "
            f"num_groups={num_groups}"
        )
    check_tensor_like_input(weight, "weight", input, (channels,))
    check_tensor_like_input(bias, "bias", input, (channels,))
    check_eps(eps)
    return resolve("group_norm", backend, input)(input, num_groups, weight, bias, eps)


def group_norm_torch(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """The "torch" backend.

    PyTorch's CPU group_norm has two kernels: the one for contiguous NCHW uses a stable
    (Welford-style) variance, the channels-last one accumulates sums of x and x^2, and for an fp32
    input of 1e4 + N(0, 1) its variance is rounding noise (outputs off by ~1e3 in our tests).
    So non-contiguous CPU inputs are copied to the contiguous layout first.
    """
    if not input.is_contiguous() and input.is_cpu:
        input = input.contiguous()
    return F.group_norm(input, num_groups, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """A drop-in for torch.nn.GroupNorm whose math runs through :func:`group_norm` and its backends."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        num_groups = check_size(num_groups, "num_groups", positive=True)
        num_channels = check_size(num_channels, "num_channels")
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} must be divisible by num_groups={num_groups}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.backend = backend
        register_affine(self, num_channels, affine=affine, bias=bias, factory_kwargs=factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, backend=self.backend)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles torch.nn.GroupNorm holding these parameters (see normlib._autograd)."""
        twin = nn.GroupNorm(
            self.num_groups, self.num_channels, self.eps, self.affine, bias=self.bias is not None, device="meta"
        )
        return scriptable_twin(self, twin)

    def extra_repr(self) -> str:
        text = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}"
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
