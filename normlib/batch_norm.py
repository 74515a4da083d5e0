"""Batch normalization (Ioffe & Szegedy, 2015): statistics per channel, shared across the batch.

For an input of shape ``(N, C, *spatial)`` -- (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -- each channel c is
standardized with the mean and variance of all its N * prod(spatial) values, then scaled and
shifted by a learned per-channel weight (gamma) and bias (beta). Because the statistics depend on
the other samples in the batch, training and evaluation differ: in training the batch's own
statistics are used and folded into running estimates; in evaluation the running estimates are.

This file holds, in reading order: the NumPy reference (forward and backward), the functional op
``batch_norm`` (``torch.nn.functional.batch_norm``'s signature plus ``backend``) and the modules
``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d`` and their lazy variants ``LazyBatchNorm1d`` /
``2d`` / ``3d``, which read num_features from the first input (drop-ins for their ``torch.nn`` twins).

One deliberate difference from torch, shared by every normlib norm: a negative ``eps`` is a
ValueError, where torch computes with it and returns NaN for channels whose variance is below -eps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from normlib._affine import register_affine, reset_affine
from normlib._autograd import scriptable_twin
from normlib._checks import (
    check_backend_name,
    check_eps,
    check_input,
    check_running_stats,
    check_size,
    check_tensor_like_input,
)
from normlib.backends import resolve

__all__ = [
    "BatchNormCache",
    "batch_norm_reference",
    "batch_norm_reference_backward",
    "batch_norm",
    "batch_norm_torch",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class BatchNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    mean: np.ndarray  # (C,) the statistics that normalized: the batch's in training, else running
    var: np.ndarray  # (C,) biased variance (divided by n) in training, running_var otherwise
    rstd: np.ndarray  # (C,) 1 / sqrt(var + eps)
    x_hat: np.ndarray  # (N, C, *spatial) the standardized input
    training: bool  # whether mean/var came from the batch (the backward differs)
    running_mean: np.ndarray | None  # (C,) running_mean after this step (a new array)
    running_var: np.ndarray | None  # (C,) running_var after this step (a new array)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector to (1, C, 1, ..., 1) so it broadcasts against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_reference(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, BatchNormCache]:
    r"""Batch normalization in float64 NumPy, written to be read next to its equations.

    With ``x`` of shape ``(N, C, *spatial)`` and m = N * prod(spatial) values per channel c:

    .. math::

        \mathrm{mean}_c = \frac{1}{m} \sum_{i} x_{i,c}, \qquad
        \mathrm{var}_c = \frac{1}{m} \sum_{i} (x_{i,c} - \mathrm{mean}_c)^2, \qquad
        \mathrm{rstd}_c = \frac{1}{\sqrt{\mathrm{var}_c + \varepsilon}}

    .. math::

        \hat{x}_{i,c} = (x_{i,c} - \mathrm{mean}_c)\, \mathrm{rstd}_c, \qquad
        y_{i,c} = \gamma_c \hat{x}_{i,c} + \beta_c

    where i runs over the batch and spatial positions, gamma is ``weight`` and beta is ``bias``.
    In training the running estimates move towards the batch statistics,

    .. math::

        \mathrm{running\_mean} &\leftarrow (1 - \mathrm{momentum})\,\mathrm{running\_mean}
            + \mathrm{momentum}\,\mathrm{mean}, \\
        \mathrm{running\_var} &\leftarrow (1 - \mathrm{momentum})\,\mathrm{running\_var}
            + \mathrm{momentum}\,\frac{m}{m-1}\mathrm{var}

    with PyTorch's convention for ``momentum``: the weight of the *new* batch (Keras calls the
    weight of the *old* estimate momentum, 0.99 there is 0.01 here). The running variance takes the
    unbiased batch variance, the normalization the biased one, as PyTorch does. In evaluation
    (``training=False``) mean and var are ``running_mean`` and ``running_var``.

    Returns ``(y, cache)``; the running estimates after the update are in the cache (the inputs are
    not modified).
    """
    x = np.asarray(x, dtype=np.float64)
    ndim = x.ndim
    reduce_axes = (0,) + tuple(range(2, ndim))  # every axis but the channel axis 1
    new_running_mean = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    new_running_var = None if running_var is None else np.array(running_var, dtype=np.float64)
    if training:
        n = x.size // x.shape[1]
        mean = x.mean(axis=reduce_axes)  # (C,)
        # Two passes: subtract the mean first, then square. E[x^2] - E[x]^2 cancels catastrophically
        # when |mean| >> std.
        var = ((x - _per_channel(mean, ndim)) ** 2).mean(axis=reduce_axes)  # (C,)
        if new_running_mean is not None:
            unbiased_var = var * n / (n - 1)
            new_running_mean = (1 - momentum) * new_running_mean + momentum * mean
            new_running_var = (1 - momentum) * new_running_var + momentum * unbiased_var
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    rstd = 1.0 / np.sqrt(var + eps)  # (C,)
    x_hat = (x - _per_channel(mean, ndim)) * _per_channel(rstd, ndim)  # (N, C, *spatial)
    y = x_hat
    if weight is not None:
        y = y * _per_channel(np.asarray(weight, dtype=np.float64), ndim)
    if bias is not None:
        y = y + _per_channel(np.asarray(bias, dtype=np.float64), ndim)
    return y, BatchNormCache(mean, var, rstd, x_hat, training, new_running_mean, new_running_var)


def batch_norm_reference_backward(
    dy: np.ndarray, cache: BatchNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dweight, dbias)`` of :func:`batch_norm_reference`, given dL/dy = ``dy``.

    The affine parameters: dweight_c = sum_i dy * x_hat, dbias_c = sum_i dy. For dx, write
    wdy = gamma * dy. In evaluation mean and rstd are constants, so dx = rstd * wdy. In training
    they depend on every x of the channel, and differentiating through them gives the classic form
    (the c1/c2 names follow Triton's layer-norm tutorial):

    .. math::

        c_1 = \frac{1}{m}\sum_i \hat{x}_i \, wdy_i, \qquad
        c_2 = \frac{1}{m}\sum_i wdy_i, \qquad
        dx_i = \mathrm{rstd}\,(wdy_i - (\hat{x}_i c_1 + c_2))

    the sums running over the m = N * prod(spatial) values of one channel. The c2 term removes the
    part of the gradient that only shifts the channel (the mean absorbs it) and the c1 term the part
    that only rescales it (the variance absorbs it).
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat, rstd = cache.x_hat, cache.rstd
    ndim = x_hat.ndim
    reduce_axes = (0,) + tuple(range(2, ndim))
    w = np.ones_like(rstd) if weight is None else np.asarray(weight, dtype=np.float64)
    dweight = (dy * x_hat).sum(axis=reduce_axes)  # (C,)
    dbias = dy.sum(axis=reduce_axes)  # (C,)
    wdy = dy * _per_channel(w, ndim)  # (N, C, *spatial)
    if not cache.training:
        return wdy * _per_channel(rstd, ndim), dweight, dbias
    c1 = (x_hat * wdy).mean(axis=reduce_axes, keepdims=True)  # (1, C, 1, ...)
    c2 = wdy.mean(axis=reduce_axes, keepdims=True)  # (1, C, 1, ...)
    dx = (wdy - (x_hat * c1 + c2)) * _per_channel(rstd, ndim)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-05,
    *,
    backend: str = "auto",
) -> Tensor:
    """Batch normalization of ``input``, ``(N, C, *spatial)``; see :func:`batch_norm_reference` for the math.

    Same arguments and behaviour as :func:`torch.nn.functional.batch_norm`: in training the batch
    statistics normalize and, when given, ``running_mean``/``running_var`` are updated in place
    with weight ``momentum`` on the new batch; otherwise the running statistics normalize.
    ``backend`` picks the implementation (see :mod:`normlib.backends`). ``eps`` must be >= 0: a
    negative one is a ValueError here (torch would return NaN), a deliberate difference.
    """
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        # torch takes an empty 1-D input (with empty running statistics) and returns it: there is no
        # channel axis to check, and nothing to normalize or to update.
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_input(input, 2, "(N, C, *spatial)")
    channels = (input.shape[1],)
    check_running_stats(running_mean, running_var, input, use_batch_stats=training)
    check_tensor_like_input(weight, "weight", input, channels)
    check_tensor_like_input(bias, "bias", input, channels)
    check_eps(eps)
    if training and eps == 0.0:  # torch refuses it too: a constant channel would divide 0 by 0
        raise ValueError("eps must be positive when training=True, got eps=0.0")
    if training and input.numel() == channels[0] != 0:  # N * prod(spatial) == 1, without slicing shape
        # One value per channel has no variance to normalize by (and an unbiased estimate 0/0).
        raise ValueError(
            f"batch_norm in training needs more than one value per channel, got input of shape "
            f"{tuple(input.shape)} (N * prod(spatial) = 1); use a batch of at least 2 or training=False"
        )
    return resolve("batch_norm", backend, input)(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


def batch_norm_torch(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """The "torch" backend.

    PyTorch's kernels compute float16/bfloat16 statistics in float32, so nothing needs upcasting.
    But its channels-last CPU kernel sums the mean less carefully than the contiguous one: on an
    fp32 input of 1e4 + N(0, 1) its outputs were off by ~1e-2 against ~1e-3 for the contiguous
    kernel in our tests. Non-contiguous CPU inputs are therefore copied to the contiguous layout.
    """
    if not input.is_contiguous() and input.is_cpu:
        input = input.contiguous()
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _NormBase(nn.Module):
    """Parameters and running-statistics buffers shared by BatchNorm and InstanceNorm.

    Mirrors ``torch.nn.modules.batchnorm._NormBase`` (PyTorch 2.13, including its keyword-only
    ``bias``) so that state_dicts load both ways: the same parameter and buffer names, shapes and
    dtypes, and buffers that exist exactly when torch's do.
    """

    _version = 2  # torch's _NormBase version: its state_dicts carry num_batches_tracked
    _torch_twin: type[nn.Module] | None = None  # what torch.jit.script compiles instead

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        num_features = check_size(num_features, "num_features")
        factory_kwargs = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        register_affine(self, num_features, affine=affine, bias=bias, factory_kwargs=factory_kwargs)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles the torch.nn twin holding these parameters and buffers (see
        normlib._autograd): TorchScript cannot compile normlib's dispatch to backends."""
        if self._torch_twin is None:
            raise RuntimeError(
                f"torch.jit.script cannot compile {type(self).__name__}: TorchScript cannot compile "
                f"normlib's dispatch to backends, and there is no scriptable torch.nn twin to compile "
                f"instead; use torch.jit.trace or torch.compile"
            )
        twin = self._torch_twin(
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
            device="meta", bias=self.bias is not None or not self.affine,
        )
        return scriptable_twin(self, twin)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # As torch's _NormBase: a state_dict saved before num_batches_tracked existed (version None
        # or 1) loads, strictly too, with the counter kept as it is (0 for a new module).
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                tracked = self.num_batches_tracked
                state_dict[key] = (
                    tracked if tracked is not None and tracked.device.type != "meta" else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


class _BatchNorm(_NormBase):
    """Batch normalization's bookkeeping: which statistics to use and how the running ones move."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # momentum is the weight of the new batch; None means a cumulative average, where batch k
        # gets weight 1/k so that the running statistics are the plain mean over all batches seen.
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                average_factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in evaluation when there are no running ones to use.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are passed only when they are to be used or updated.
        keep_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            average_factor,
            self.eps,
            backend=self.backend,
        )


class _FixedRankBatchNorm(_BatchNorm):
    """A BatchNorm whose input must have one of ``_ranks`` dimensions, shaped as ``_shapes`` says."""

    _ranks: tuple[int, ...]
    _shapes: str

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            name = self._torch_twin.__name__  # the Lazy variants report the class they become
            raise ValueError(
                f"{name} expects input of shape {self._shapes}, got a {input.dim()}-D input "
                f"of shape {tuple(input.shape)}"
            )


class BatchNorm1d(_FixedRankBatchNorm):
    """Batch normalization for (N, C) features or (N, C, L) sequences; a drop-in for nn.BatchNorm1d."""

    _torch_twin = nn.BatchNorm1d
    _ranks, _shapes = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_FixedRankBatchNorm):
    """Batch normalization for (N, C, H, W) feature maps; a drop-in for nn.BatchNorm2d."""

    _torch_twin = nn.BatchNorm2d
    _ranks, _shapes = (4,), "(N, C, H, W)"


class BatchNorm3d(_FixedRankBatchNorm):
    """Batch normalization for (N, C, D, H, W) volumes; a drop-in for nn.BatchNorm3d."""

    _torch_twin = nn.BatchNorm3d
    _ranks, _shapes = (5,), "(N, C, D, H, W)"


class _LazyBatchNorm(LazyModuleMixin, _BatchNorm):
    """A BatchNorm whose num_features is read from the first input, as torch.nn.LazyBatchNorm*d.

    Mirrors ``torch.nn.modules.batchnorm._LazyNormBase``: parameters and running statistics start
    uninitialized and take shape (C,) at the first forward, after which the module turns into
    its ``cls_to_become`` (normlib.BatchNorm1d/2d/3d).
    """

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        # affine and track_running_stats off here, so that no tensor is made only to be replaced
        super().__init__(0, eps, momentum, False, False, device, dtype, bias=False, backend=backend)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            if bias:
                self.bias = UninitializedParameter(**factory_kwargs)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor) -> None:
        if self.has_uninitialized_params():
            self.num_features = input.shape[1]
            if self.affine:
                self.weight.materialize((self.num_features,))
                if self.bias is not None:
                    self.bias.materialize((self.num_features,))
            if self.track_running_stats:
                self.running_mean.materialize((self.num_features,))
                self.running_var.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """BatchNorm1d with num_features read from the first input; a drop-in for nn.LazyBatchNorm1d."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """BatchNorm2d with num_features read from the first input; a drop-in for nn.LazyBatchNorm2d."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """BatchNorm3d with num_features read from the first input; a drop-in for nn.LazyBatchNorm3d."""

    cls_to_become = BatchNorm3d
