"""BatchNorm whose statistics are those of the global batch when the batch is split across processes.

Under data parallelism every process (one per GPU, or one per CPU worker with gloo) sees only its
slice of the batch, so a plain BatchNorm normalizes with the statistics of that slice: with 8
devices and a batch of 16, each BatchNorm sees 2 samples. Synchronized BatchNorm, used for
cross-GPU object detection by Peng et al. (2018, MegDet), makes every process normalize with the
statistics of all 16.

The forward pass exchanges three numbers per channel and process, the count, the mean and ``m2``
(the sum of squared deviations from the mean), and merges them with the parallel formula of
Chan, Golub & LeVeque (1983), which stays accurate when the processes' batches differ in size or
are empty. The backward pass all-reduces the two per-channel sums the input gradient needs
(``sum_dy`` and ``sum_dy_xhat``). Without an initialized process group, with a group of one
process, or in eval mode, the layer is exactly :class:`~normlib.batch_norm.BatchNorm2d` and friends.

Every process must call the layer the same number of times, forward and backward: each call is a
collective, and a process that skips one leaves the others waiting.
"""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlib._checks import check_eps, check_input, check_running_stats, check_tensor_like_input
from normlib.batch_norm import _BatchNorm, batch_norm

__all__ = [
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "sync_batch_norm",
    "local_moments",
    "merge_moments",
]

# Which devices each torch.distributed backend can run all_gather and all_reduce on. gloo also
# all-reduces CUDA tensors, but it cannot all_gather them, which the forward pass needs.
BACKEND_DEVICES: dict[str, tuple[str, ...]] = {
    "gloo": ("cpu",),
    "nccl": ("cuda",),
    "mpi": ("cpu",),
}


# ----------------------------------------------------------------------------------------------
# The statistics: per process, then merged
# ----------------------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are summed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_moments(input: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, m2)`` per channel of this process's batch ``input`` (N, C, *spatial).

    ``count`` is N * prod(spatial), the same for every channel; ``mean`` and ``m2`` (sum of squared
    deviations from ``mean``) have shape (C,) and the accumulation dtype. Computed in two passes
    (mean first, then deviations), which does not lose digits the way sum(x^2) - n * mean^2 does
    when the mean is large compared with the spread. An empty batch gives count 0 and zeros.
    """
    acc = accumulation_dtype(input.dtype)
    channels = input.shape[1]
    spatial = math.prod(input.shape[2:])  # explicit: reshape cannot infer -1 for an empty batch
    x = input.to(acc).reshape(input.shape[0], channels, spatial)  # (N, C, L), L = prod(spatial)
    count = x.shape[0] * x.shape[2]
    if count == 0:
        zeros = torch.zeros(channels, dtype=acc, device=input.device)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)  # (C,), (C,)
    return count, mean, var * count


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the moments of P disjoint batches into those of their union (Chan et al., 1983).

    ``counts`` (P,), ``means`` and ``m2s`` (P, C) -> ``count`` (scalar), ``mean`` (C,), ``m2`` (C,):

        count = sum_p n_p
        mean  = sum_p n_p * mean_p / count
        m2    = sum_p m2_p + sum_p n_p * (mean_p - mean)^2

    The last line is Chan et al.'s pairwise update applied to all P batches at once: the squared
    deviations of the whole batch from ``mean`` split into those inside each batch (``m2_p``) and
    those of each batch's mean from ``mean``. Only differences of means are squared, so nothing
    large cancels. A batch with n_p = 0 contributes nothing, whatever its mean says.
    """
    if counts.dim() != 1 or means.shape != m2s.shape or means.shape[:1] != counts.shape:
        raise ValueError(
            f"expected counts of shape (P,) and means, m2s of shape (P, C); got counts "
            f"{tuple(counts.shape)}, means {tuple(means.shape)}, m2s {tuple(m2s.shape)}"
        )
    count = counts.sum()
    weights = (counts / count.clamp(min=1)).unsqueeze(1)  # (P, 1); clamp: all-empty gives zeros
    mean = (weights * means).sum(dim=0)  # (C,)
    between = counts.unsqueeze(1) * (means - mean) ** 2  # (P, C)
    m2 = m2s.sum(dim=0) + between.sum(dim=0)  # (C,)
    return count, mean, m2


def _gather_moments(count: int, mean: Tensor, m2: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """All processes' ``(count, mean, m2)``, stacked in rank order: (P,), (P, C), (P, C).

    Packed into one float64 tensor so that the exchange is a single collective; float64 also keeps
    counts above 2**24 exact.
    """
    channels = mean.shape[0]
    packed = torch.cat([mean.new_tensor([count]), mean, m2]).to(torch.float64)  # (1 + 2C,)
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    stacked = torch.stack(gathered)  # (P, 1 + 2C)
    return stacked[:, 0], stacked[:, 1 : 1 + channels], stacked[:, 1 + channels :]


# ----------------------------------------------------------------------------------------------
# The autograd function: forward and backward, each with one collective
# ----------------------------------------------------------------------------------------------


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ..., 1) so that it broadcasts against an (N, C, *spatial) tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with global statistics; returns ``(output, mean, var, count)``.

    ``mean`` and ``var`` (biased, divided by ``count``) are the global batch's, for the running
    statistics; they are not differentiable.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        acc = accumulation_dtype(input.dtype)
        count, mean, m2 = merge_moments(*_gather_moments(*local_moments(input), group))
        total = int(count.item())
        if total <= 1:
            raise ValueError(
                f"SyncBatchNorm in training needs more than one value per channel across all "
                f"processes, got {total} (this process's input has shape {tuple(input.shape)})"
            )
        mean = mean.to(acc)  # (C,)
        var = (m2 / total).to(acc)  # (C,), biased: what normalizes
        rstd = torch.rsqrt(var + eps)  # (C,)
        x_hat = (input.to(acc) - _per_channel(mean, input.dim())) * _per_channel(rstd, input.dim())
        y = x_hat
        if weight is not None:
            y = y * _per_channel(weight.to(acc), input.dim())
        if bias is not None:
            y = y + _per_channel(bias.to(acc), input.dim())
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.total = total
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(input.dtype), mean, var, total

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dcount):
        input, weight, mean, rstd = ctx.saved_tensors
        ndim = input.dim()
        acc = mean.dtype
        dy = dy.to(acc)
        x_hat = (input.to(acc) - _per_channel(mean, ndim)) * _per_channel(rstd, ndim)
        axes = [0] + list(range(2, ndim))  # every axis but the channels
        sum_dy = dy.sum(dim=axes)  # (C,), this process only
        sum_dy_xhat = (dy * x_hat).sum(dim=axes)  # (C,), this process only

        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            # x_hat depends on every sample of every process through mean and var, so dx needs the
            # two sums over the global batch. Divided by the global count they are c1 and c2 of
            #   dx = (w * dy - (x_hat * c1 + c2)) * rstd.
            sums = torch.cat([sum_dy, sum_dy_xhat])  # (2C,)
            dist.all_reduce(sums, group=ctx.group)
            w = torch.ones_like(rstd) if weight is None else weight.to(acc)  # (C,)
            c1 = w * sums[sum_dy.shape[0] :] / ctx.total  # (C,)
            c2 = w * sums[: sum_dy.shape[0]] / ctx.total  # (C,)
            wdy = dy * _per_channel(w, ndim)
            dx = (wdy - (x_hat * _per_channel(c1, ndim) + _per_channel(c2, ndim))) * _per_channel(rstd, ndim)
            dx = dx.to(input.dtype)
        # The parameters' gradients stay per process, sums over this process's samples only:
        # data parallelism (DDP, or an explicit all_reduce) combines them like every other gradient.
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None


def _first_derivative_only(backward):
    """``backward``, refusing to run when a graph of it is being recorded (create_graph=True, as a
    gradient penalty needs): the one above treats the global mean and rstd as constants and
    all-reduces outside autograd, so a graph of it would give a wrong second derivative."""

    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "SyncBatchNorm with more than one process does not support double backward "
                "(backward with create_graph=True, e.g. a gradient penalty); use create_graph=False, "
                "or BatchNorm on one process"
            )
        return backward(ctx, *grads)

    return staticmethod(checked)


_SyncBatchNormFunction.backward = _first_derivative_only(_SyncBatchNormFunction.backward)


# ----------------------------------------------------------------------------------------------
# Functional op
# ----------------------------------------------------------------------------------------------


def check_backend_supports(backend: str, device: torch.device) -> None:
    """Raise if a process group with ``backend`` (``dist.get_backend(group)``) cannot synchronize
    tensors on ``device``. ``backend`` may name one backend ("gloo") or one per device
    ("cpu:gloo,cuda:nccl", what ``init_process_group()`` without a backend gives); backends not in
    :data:`BACKEND_DEVICES` are trusted."""
    if ":" in backend:
        per_device = dict(part.split(":", 1) for part in backend.split(","))
        if device.type not in per_device:
            raise ValueError(
                f"SyncBatchNorm got input on {device.type!r}, but its process group has backends only "
                f"for {sorted(per_device)} ({backend!r}); move the input or create the group with a "
                f"backend for {device.type!r} (gloo for CPU tensors, nccl for CUDA tensors)"
            )
        backend = per_device[device.type]
    devices = BACKEND_DEVICES.get(backend)
    if devices is not None and device.type not in devices:
        raise ValueError(
            f"SyncBatchNorm got input on {device.type!r}, but its process group's backend "
            f"{backend!r} synchronizes only {' or '.join(devices)} tensors; use backend 'gloo' for "
            f"CPU tensors and 'nccl' for CUDA tensors"
        )


def _sync_world_size(process_group) -> int:
    """Processes to synchronize with: 1 when torch.distributed is absent or not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-05,
    *,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`normlib.batch_norm` (same arguments) whose training statistics are the global batch's.

    ``process_group`` is the group to synchronize over (None: the default group). In training with
    more than one process, the batch statistics are those of all processes' inputs together and
    ``running_mean``/``running_var`` move towards them exactly as a single process holding the
    whole batch would move them (the variance unbiased with the global count). Otherwise this is
    :func:`normlib.batch_norm`, to which ``backend`` is passed.
    """
    world_size = _sync_world_size(process_group) if training else 1
    if world_size == 1:
        return batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, backend=backend
        )
    check_input(input, 2, "(N, C, *spatial)")
    channels = (input.shape[1],)
    check_running_stats(running_mean, running_var, input, use_batch_stats=True)
    check_tensor_like_input(weight, "weight", input, channels)
    check_tensor_like_input(bias, "bias", input, channels)
    check_eps(eps)
    check_backend_supports(dist.get_backend(process_group), input.device)
    output, mean, var, total = _SyncBatchNormFunction.apply(input, weight, bias, eps, process_group)
    if running_mean is not None:
        with torch.no_grad():
            unbiased_var = var * (total / (total - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)
    return output


# ----------------------------------------------------------------------------------------------
# Module and model conversion
# ----------------------------------------------------------------------------------------------


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a data-parallel job; a drop-in for nn.SyncBatchNorm.

    Same constructor arguments as :class:`torch.nn.SyncBatchNorm` (plus normlib's keyword-only
    ``backend`` for the single-process path) and the same parameters, buffers and state_dict keys
    as every BatchNorm, so weights move freely between them. Accepts ``(N, C, *spatial)`` inputs of any
    rank. Statistics are synchronized in training mode only: in eval mode each process normalizes
    with its running statistics, which are the same everywhere because they were updated from the
    same global statistics.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, backend=backend
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expects input of shape (N, C, *spatial) with at least 2 dimensions, "
                f"got a {input.dim()}-D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm was built for num_features={self.num_features} channels, but the "
                f"input has {input.shape[1]} channels (dimension 1 of shape {tuple(input.shape)})"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # The same bookkeeping as BatchNorm (see normlib.batch_norm._BatchNorm.forward).
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                average_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        if not self.training:
            # Evaluation is per process, as in torch.nn.SyncBatchNorm: nothing to synchronize.
            return batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                average_factor, self.eps, backend=self.backend,
            )
        return sync_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, True, average_factor,
            self.eps, process_group=self.process_group, backend=self.backend,
        )


def _is_batch_norm(module: nn.Module) -> bool:
    """torch's or normlib's BatchNorm1d/2d/3d (or torch's SyncBatchNorm), but not a SyncBatchNorm
    of normlib's, which needs no conversion."""
    if isinstance(module, SyncBatchNorm):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, _BatchNorm)


def _copy_batch_norm_state(source: nn.Module, target: nn.Module) -> None:
    """Move ``source``'s parameters and buffers into ``target``, sharing the tensors (as
    torch.nn.SyncBatchNorm.convert_sync_batchnorm does) so an optimizer built on the original
    model keeps updating the converted one."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's or normlib's) in ``module`` by a normlib SyncBatchNorm.

    Parameters and buffers are carried over (the same tensors), so the converted model computes
    what the original did until it trains with more than one process. Returns the converted
    module: ``module`` itself with its children replaced, or a new layer when ``module`` is a
    BatchNorm. :func:`revert_sync_batchnorm` undoes it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    converted = module
    if _is_batch_norm(module):
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"cannot convert an uninitialized {type(module).__name__}: run one batch through the "
                f"model first so that the lazy layer knows its num_features"
            )
        reference = module.weight if module.affine else module.running_mean
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device=None if reference is None else reference.device,
            dtype=None if reference is None else reference.dtype,
            bias=module.bias is not None,
            backend=getattr(module, "backend", "auto"),
        )
        _copy_batch_norm_state(module, converted)
        converted.converted_from = type(module)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


def revert_sync_batchnorm(module: nn.Module, default: type[nn.Module] | None = None) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: each SyncBatchNorm becomes the class it was converted
    from, or ``default`` (e.g. ``normlib.BatchNorm2d``) for one built directly; parameters and
    buffers are carried over. For evaluating or exporting a model on one process."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    reverted = module
    if isinstance(module, SyncBatchNorm):
        cls = getattr(module, "converted_from", None) or default
        if cls is None:
            raise ValueError(
                "this SyncBatchNorm was not made by convert_sync_batchnorm, so the BatchNorm class to "
                "return to is unknown; pass default=, e.g. default=normlib.BatchNorm2d"
            )
        reference = module.weight if module.affine else module.running_mean
        reverted = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=None if reference is None else reference.device,
            dtype=None if reference is None else reference.dtype,
            bias=module.bias is not None,
        )
        _copy_batch_norm_state(module, reverted)
    for name, child in module.named_children():
        reverted.add_module(name, revert_sync_batchnorm(child, default))
    return reverted
