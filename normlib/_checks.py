"""Argument checks shared by the public ops, so every norm fails the same way on the same mistake.

Each public op checks its arguments once, before any backend runs: a wrong shape or dtype then
fails with a sentence that names the argument and what was expected, instead of an error from deep
inside a kernel. The happy path only compares; messages are formatted only when a check fails,
because the public ops must stay cheap on tiny tensors.

Conventions: a wrong type or dtype raises TypeError; a wrong shape, value or device raises
ValueError.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from normlib.backends import BACKENDS

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
COMPLEX_DTYPES = frozenset({torch.complex64, torch.complex128})

# RMSNorm's eps=None, as torch.nn.functional.rms_norm resolves it: the machine epsilon of the dtype
# the statistics are computed in (float32 for float16/bfloat16/float32 inputs, float64 for float64),
# not of the input's dtype (float16's 9.8e-4 would visibly bias small rows). Looked up once because
# it is read on every call.
RMS_NORM_DEFAULT_EPS = {
    dtype: torch.finfo(torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32).eps
    for dtype in FLOAT_DTYPES | COMPLEX_DTYPES
}


def check_input(input: torch.Tensor, min_dim: int, layout: str, *, allow_complex: bool = False) -> None:
    """``input`` is a floating-point tensor with at least ``min_dim`` dimensions (``layout`` names them).

    ``allow_complex`` also admits complex64/complex128, for the ops whose torch twin takes them.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES and not (allow_complex and input.dtype in COMPLEX_DTYPES):
        raise TypeError(
            f"input must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {input.dtype}; convert it first, e.g. input.float()"
        )
    if input.dim() < min_dim:
        raise ValueError(
            f"input must have at least {min_dim} dimensions {layout}, got shape {tuple(input.shape)}"
        )


def check_tensor_like_input(
    tensor: torch.Tensor | None, name: str, input: torch.Tensor, shape: Sequence[int]
) -> None:
    """An optional tensor argument (weight, bias, running stats): float, on input's device, of ``shape``."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES and not (tensor.dtype in COMPLEX_DTYPES and input.dtype in COMPLEX_DTYPES):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    # is_cpu first: reading .device builds a torch.device object, twice the cost on small tensors
    if not (tensor.is_cpu and input.is_cpu) and tensor.device != input.device:
        raise ValueError(
            f"{name} is on device {tensor.device} but input is on {input.device}; "
            f"expected both on the same device"
        )
    if tensor.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_residual(residual: torch.Tensor, input: torch.Tensor) -> None:
    """The residual of a fused add + norm: same shape, dtype and device as ``input``."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.device != input.device:
        raise ValueError(
            f"residual is on device {residual.device} but input is on {input.device}; "
            f"expected both on the same device"
        )
    if residual.dtype != input.dtype:
        raise TypeError(
            f"residual must have the dtype of input ({input.dtype}), got {residual.dtype}; "
            f"the sum input + residual is returned in that dtype"
        )
    if residual.shape != input.shape:
        raise ValueError(
            f"residual must have the shape of input {tuple(input.shape)}, got {tuple(residual.shape)}"
        )


def check_normalized_shape(normalized_shape: int | Sequence[int], input: torch.Tensor) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple, after checking it equals the trailing dimensions of ``input``."""
    # Fast paths for the usual spellings, 8 and (8,) (the modules store a tuple of ints);
    # everything else (lists, torch.Size, NumPy integers) takes the general path.
    if type(normalized_shape) is int:
        shape: tuple[int, ...] = (normalized_shape,)
    elif type(normalized_shape) is tuple and len(normalized_shape) == 1 and type(normalized_shape[0]) is int:
        shape = normalized_shape
    elif type(normalized_shape) is tuple and normalized_shape and all(type(size) is int for size in normalized_shape):
        shape = normalized_shape
    else:
        shape = _as_shape(normalized_shape)
    count = len(shape)
    if count == 1:  # the public ops have checked input.dim() >= 1 already (check_input)
        matches = input.shape[-1] == shape[0]
    else:
        matches = input.dim() >= count and input.shape[-count:] == shape
    if not matches:
        raise ValueError(
            f"normalized_shape={list(shape)} must equal the last {count} dimension(s) of input, "
            f"got input of shape {tuple(input.shape)}"
        )
    return shape


def _as_shape(normalized_shape: object) -> tuple[int, ...]:
    expected = "normalized_shape must be an int or a non-empty sequence of ints"
    if hasattr(normalized_shape, "__index__") and not isinstance(normalized_shape, Sequence):
        try:  # an integer of another type, e.g. np.int64(8)
            return (operator.index(normalized_shape),)
        except TypeError:
            pass
    if isinstance(normalized_shape, (str, bytes)) or not isinstance(normalized_shape, Sequence):
        raise TypeError(f"{expected}, got {normalized_shape!r}")
    try:
        shape = tuple(operator.index(size) for size in normalized_shape)
    except TypeError:
        raise TypeError(f"{expected}, got {normalized_shape!r}") from None
    if not shape:
        raise ValueError(f"{expected}, got ()")
    return shape


def check_size(value: object, name: str, *, positive: bool = False) -> int:
    """A size (a Python int, or anything ``operator.index`` accepts, such as ``np.int64``) as a plain
    int, so that what a module stores and prints is what torch's twin would; >= 0, or > 0 if
    ``positive``."""
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}") from None
    if size < int(positive):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} int, got {size}")
    return size


def as_normalized_shape(normalized_shape: object) -> tuple[int, ...]:
    """A module's ``normalized_shape`` (an int, or a sequence of ints, NumPy integers included) as
    the tuple of plain ints that torch's twin stores."""
    if isinstance(normalized_shape, (str, bytes)):
        raise TypeError(f"normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    return _as_shape(normalized_shape)


def check_eps(eps: float) -> None:
    """eps >= 0. A deliberate difference from torch, which takes a negative eps and returns NaN
    (or a wrong, finite answer) for rows whose variance is below -eps: here it is an error."""
    if not eps >= 0.0:  # also catches NaN
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def check_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    input: torch.Tensor,
    use_batch_stats: bool,
) -> None:
    """Running statistics: both or neither, per channel, and present when they are what normalizes."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together (both tensors or both None), got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if running_mean is None:
        if not use_batch_stats:
            raise ValueError(
                "running_mean and running_var are required when the batch's own statistics are not "
                "used (training=False / use_input_stats=False): they are what normalizes the input"
            )
        return
    channels = (input.shape[1],)
    check_tensor_like_input(running_mean, "running_mean", input, channels)
    check_tensor_like_input(running_var, "running_var", input, channels)


def check_backend_name(backend: str) -> None:
    """Fail at construction time on a misspelt backend rather than at the first forward."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; expected 'auto' or one of {list(BACKENDS)}")
