"""Batch Renormalization (Ioffe, 2017): BatchNorm whose training output matches its inference output.

BatchNorm normalizes with the batch's statistics in training and with running averages at
inference, so the network is trained on one function and deployed as another; with small or
non-i.i.d. batches the two drift apart. Batch Renormalization keeps BatchNorm's gradient through
the batch statistics but corrects the batch-normalized value towards what the running statistics
would give,

    (x - mean_B) / sigma_B * r + d = (x - running_mean) / sigma     when r and d are not clipped,

with r = sigma_B / sigma and d = (mean_B - running_mean) / sigma treated as constants by the
gradient (stop-gradient). r is clipped to [1/r_max, r_max] and d to [-d_max, d_max]; with
r_max = 1 and d_max = 0 the layer *is* BatchNorm. The paper starts with that setting and relaxes
the limits during training: in its Inception experiments r_max = 1, d_max = 0 for the first 5000
steps, then r_max grows to 3 (reached at 40k steps) and d_max to 5 (reached at 25k steps).

Conventions, stated once: sigma = sqrt(running_var + eps), and the running statistics move as in
torch.nn.BatchNorm2d (``momentum`` is the weight of the new batch, running_var averages the
*unbiased* batch variance). The paper averages sigma_B itself; keeping BatchNorm's buffers instead
means a trained BatchRenorm2d's ``state_dict`` loads into ``nn.BatchNorm2d``, which then computes
exactly this layer's inference output. Chainer's batch_renormalization makes the same choice.

This file holds, in reading order: the NumPy reference (forward and backward), the functional op
``batch_renorm`` and the module ``BatchRenorm2d``. There is no ``torch.nn.functional`` twin and no
fused kernel, so the op is written with torch operations (no ``backend`` argument).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from normlib._affine import register_affine, reset_affine
from normlib._checks import check_eps, check_input, check_running_stats, check_tensor_like_input

__all__ = [
    "BatchRenormCache",
    "batch_renorm_reference",
    "batch_renorm_reference_backward",
    "batch_renorm",
    "BatchRenorm2d",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class BatchRenormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    mean: np.ndarray  # (C,) batch mean in training, running_mean otherwise
    rstd: np.ndarray  # (C,) 1 / sigma_B in training, 1 / sigma otherwise
    x_hat: np.ndarray  # (N, C, *spatial) (x - mean) * rstd, before the correction
    r: np.ndarray  # (C,) clipped sigma_B / sigma (1 in evaluation)
    d: np.ndarray  # (C,) clipped (mean_B - running_mean) / sigma (0 in evaluation)
    training: bool
    running_mean: np.ndarray  # (C,) after this step (a new array)
    running_var: np.ndarray  # (C,) after this step (a new array)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (1, C, 1, ..., 1), to broadcast against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_renorm_reference(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> tuple[np.ndarray, BatchRenormCache]:
    r"""Batch Renormalization in float64 NumPy (Ioffe, 2017, Algorithm 1), next to its equations.

    With ``x`` of shape ``(N, C, *spatial)`` and m = N * prod(spatial) values per channel, in training:

    .. math::

        \mathrm{mean}_B = \frac{1}{m}\sum_i x_i, \qquad
        \sigma_B = \sqrt{\frac{1}{m}\sum_i (x_i - \mathrm{mean}_B)^2 + \varepsilon}, \qquad
        \sigma = \sqrt{\mathrm{running\_var} + \varepsilon}

    .. math::

        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \qquad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mathrm{mean}_B - \mathrm{running\_mean}}{\sigma}\right)

    .. math::

        \hat{x}_i = \frac{x_i - \mathrm{mean}_B}{\sigma_B}, \qquad
        y_i = \gamma\,(\hat{x}_i\, r + d) + \beta

    per channel, r and d being constants for the gradient. Afterwards the running statistics move
    as in BatchNorm (:func:`normlib.batch_norm.batch_norm_reference`). In evaluation r = 1, d = 0
    and the running statistics normalize: y = gamma (x - running_mean) / sigma + beta.
    Returns ``(y, cache)``; the inputs are not modified.
    """
    x = np.asarray(x, dtype=np.float64)
    ndim = x.ndim
    reduce_axes = (0,) + tuple(range(2, ndim))  # every axis but the channel axis 1
    running_mean = np.array(running_mean, dtype=np.float64)
    running_var = np.array(running_var, dtype=np.float64)
    sigma = np.sqrt(running_var + eps)  # (C,)
    if training:
        m = x.size // x.shape[1]
        mean = x.mean(axis=reduce_axes)  # (C,)
        var = ((x - _per_channel(mean, ndim)) ** 2).mean(axis=reduce_axes)  # (C,) biased
        sigma_batch = np.sqrt(var + eps)
        r = np.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
        d = np.clip((mean - running_mean) / sigma, -d_max, d_max)
        rstd = 1.0 / sigma_batch
        new_running_mean = (1 - momentum) * running_mean + momentum * mean
        new_running_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, rstd = running_mean, 1.0 / sigma
        r, d = np.ones_like(sigma), np.zeros_like(sigma)
        new_running_mean, new_running_var = running_mean, running_var
    x_hat = (x - _per_channel(mean, ndim)) * _per_channel(rstd, ndim)  # (N, C, *spatial)
    y = x_hat * _per_channel(r, ndim) + _per_channel(d, ndim)
    if weight is not None:
        y = y * _per_channel(np.asarray(weight, dtype=np.float64), ndim)
    if bias is not None:
        y = y + _per_channel(np.asarray(bias, dtype=np.float64), ndim)
    return y, BatchRenormCache(mean, rstd, x_hat, r, d, training, new_running_mean, new_running_var)


def batch_renorm_reference_backward(
    dy: np.ndarray, cache: BatchRenormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dweight, dbias)`` of :func:`batch_renorm_reference`, given dL/dy = ``dy``.

    dweight = sum_i dy (x_hat r + d), dbias = sum_i dy. Since r and d are constants for the
    gradient, dx is BatchNorm's with wdy = gamma * r * dy:

    .. math::

        c_1 = \frac{1}{m}\sum_i \hat{x}_i\, wdy_i, \qquad
        c_2 = \frac{1}{m}\sum_i wdy_i, \qquad
        dx_i = \mathrm{rstd}\,(wdy_i - (\hat{x}_i c_1 + c_2))

    (in evaluation, dx = rstd * wdy). The gradient still flows through mean_B and sigma_B, which is
    what keeps the layer as easy to train as BatchNorm.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat, rstd = cache.x_hat, cache.rstd
    ndim = x_hat.ndim
    reduce_axes = (0,) + tuple(range(2, ndim))
    r, d = _per_channel(cache.r, ndim), _per_channel(cache.d, ndim)
    dweight = (dy * (x_hat * r + d)).sum(axis=reduce_axes)  # (C,)
    dbias = dy.sum(axis=reduce_axes)  # (C,)
    gamma = np.ones_like(rstd) if weight is None else np.asarray(weight, dtype=np.float64)
    wdy = dy * _per_channel(gamma, ndim) * r  # (N, C, *spatial)
    if not cache.training:
        return wdy * _per_channel(rstd, ndim), dweight, dbias
    c1 = (x_hat * wdy).mean(axis=reduce_axes, keepdims=True)  # (1, C, 1, ...)
    c2 = wdy.mean(axis=reduce_axes, keepdims=True)  # (1, C, 1, ...)
    dx = (wdy - (x_hat * c1 + c2)) * _per_channel(rstd, ndim)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def _check_limits(r_max: float, d_max: float) -> None:
    if not r_max >= 1.0:  # also catches NaN
        raise ValueError(f"r_max must be a number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be a number >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}")


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> Tensor:
    """Batch Renormalization of ``input``, ``(N, C, *spatial)``; see :func:`batch_renorm_reference`.

    The arguments are :func:`torch.nn.functional.batch_norm`'s plus the clipping limits. The running
    statistics are required (r and d are measured against them) and, in training, updated in
    place. float16/bfloat16 inputs are normalized in float32 and the result rounded back.
    """
    check_input(input, 2, "(N, C, *spatial)")
    check_running_stats(running_mean, running_var, input, use_batch_stats=False)
    channels = (input.shape[1],)
    check_tensor_like_input(weight, "weight", input, channels)
    check_tensor_like_input(bias, "bias", input, channels)
    check_eps(eps)
    _check_limits(r_max, d_max)
    values_per_channel = input.numel() // max(channels[0], 1)
    if training and values_per_channel < 2:
        raise ValueError(
            f"batch_renorm in training needs more than one value per channel, got input of shape "
            f"{tuple(input.shape)}; use a batch of at least 2 or training=False"
        )
    shape = (1, -1) + (1,) * (input.dim() - 2)  # (C,) -> (1, C, 1, ...)
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    sigma = torch.sqrt(running_var.to(x.dtype) + eps)  # (C,)
    if training:
        reduce_dims = [0] + list(range(2, input.dim()))
        var, mean = torch.var_mean(x, dim=reduce_dims, unbiased=False)  # (C,), (C,)
        sigma_batch = torch.sqrt(var + eps)
        with torch.no_grad():  # r and d are constants for the gradient (the paper's stop_gradient)
            r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(x.dtype)) / sigma).clamp(-d_max, d_max)
            unbiased_var = var * (values_per_channel / (values_per_channel - 1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased_var.to(running_var.dtype), momentum)
        x_hat = (x - mean.view(shape)) / sigma_batch.view(shape)  # (N, C, *spatial)
        y = x_hat * r.view(shape) + d.view(shape)
    else:
        y = (x - running_mean.to(x.dtype).view(shape)) / sigma.view(shape)
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y.to(input.dtype)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class BatchRenorm2d(nn.Module):
    """Batch Renormalization for (N, C, H, W) maps, with the paper's schedule for r_max and d_max.

    Built like ``nn.BatchNorm2d`` (same first arguments, parameters ``weight``/``bias``, buffers
    ``running_mean``/``running_var``/``num_batches_tracked``, so ``state_dict`` keys match), plus:

    - ``r_max``, ``d_max``: the final clipping limits (the paper uses 3 and 5);
    - ``warmup_steps``: training steps with r_max = 1, d_max = 0, i.e. plain BatchNorm, while the
      running statistics become meaningful;
    - ``ramp_steps``: steps over which both limits then grow linearly to their final values.

    The step count is ``num_batches_tracked``, a buffer, so the schedule resumes from a checkpoint.
    Running statistics are required, so there is no ``track_running_stats`` argument.
    """

    _version = 2  # as nn.BatchNorm2d's: its state_dicts carry num_batches_tracked

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        check_eps(eps)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1] (the weight of the new batch), got {momentum!r}")
        _check_limits(r_max, d_max)
        for name, steps in (("warmup_steps", warmup_steps), ("ramp_steps", ramp_steps)):
            if not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be an int >= 0, got {steps!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        register_affine(self, num_features, affine=affine, bias=True, factory_kwargs=factory_kwargs)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step: (1, 0) during warm-up, then a linear ramp."""
        step = int(self.num_batches_tracked)
        if step < self.warmup_steps:
            return 1.0, 0.0
        progress = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        return 1.0 + progress * (self.r_max - 1.0), progress * self.d_max

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor) or input.dim() != 4:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"BatchRenorm2d expects input of shape (N, C, H, W), got {shape}")
        r_max, d_max = self.current_limits()
        if self.training:
            self.num_batches_tracked.add_(1)
        return batch_renorm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps, r_max, d_max,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max:g}, d_max={self.d_max:g}, warmup_steps={self.warmup_steps}, "
            f"ramp_steps={self.ramp_steps}"
        )
