"""Which implementation of a normalization op runs: the one place that decides.

Every public op (``normlib.layer_norm``, ``normlib.rms_norm``, ...) checks its arguments once and
then asks :func:`resolve` for the function that does the work. Implementations are grouped into
*backends*:

``"torch"``
    PyTorch's own ops. Always available, on every device; the baseline every other backend is
    tested against.
``"cpu"``
    normlib's fused CPU path for the ops where PyTorch's CPU op is an unfused chain
    (RMSNorm and the residual-add + norm ops). See ``normlib/cpu.py``.
``"triton"``
    Fused Triton kernels (``normlib/kernels/``) for CUDA tensors, or for CPU tensors when
    ``TRITON_INTERPRET=1`` runs them through Triton's interpreter (how CI tests them).

``backend="auto"`` picks, for the input's device, the first backend in ``AUTO_ORDER`` that is
installed, supports that device and implements the op; an input dtype that backend would compute
less precisely (float64 on the float32 Triton kernels) goes to PyTorch instead, and naming such a
backend explicitly for it is an error. Implementations are named by
``"module:function"`` strings and imported on first use, so ``import normlib`` never imports
triton and works on any machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["AUTO_ORDER", "BACKENDS", "IMPLEMENTATIONS", "available_backends", "resolve"]


def _triton_installed() -> str | None:
    """None if triton can be used, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_interpreting():
        return None
    return (
        f"the 'triton' backend runs CUDA tensors (or CPU tensors when the environment variable "
        f"TRITON_INTERPRET=1 is set before triton is imported); got a tensor on {device.type!r}"
    )


def _cpu_device(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    return f"the 'cpu' backend runs CPU tensors; got a tensor on {device.type!r}"


def _always(*_args) -> None:
    return None


# The Triton kernels hold their statistics and arithmetic in float32: a float64 input would be
# computed to float32's precision and returned as float64 that looks exact but is not.
TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _triton_dtype(dtype: torch.dtype) -> str | None:
    if dtype in TRITON_DTYPES:
        return None
    return (
        f"the 'triton' kernels compute in float32 and take float16, bfloat16 or float32 input, "
        f"got {dtype}; use backend='torch' (backend='auto' sends {dtype} there)"
    )


@dataclass(frozen=True)
class Backend:
    """A family of implementations and the conditions under which it can run.

    Both checks return ``None`` when fine and otherwise a sentence saying why not, so the error a
    user sees explains what to change.
    """

    name: str
    unavailable_reason: Callable[[], str | None]
    unsupported_device_reason: Callable[[torch.device], str | None]
    # The input dtypes the backend computes exactly as documented; None: every dtype the public op
    # accepts. "auto" sends the others to PyTorch, and the backend's entries refuse them.
    dtypes: frozenset[torch.dtype] | None = None
    unsupported_dtype_reason: Callable[[torch.dtype], str | None] = _always


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", _always, _always),
    # always available: without a C compiler its ops run blocked PyTorch code (normlib/cpu/blocked.py)
    "cpu": Backend("cpu", _always, _cpu_device),
    "triton": Backend("triton", _triton_installed, _triton_device, TRITON_DTYPES, _triton_dtype),
}

# op -> backend -> "module:function". Each function takes the op's arguments positionally, in the
# public op's order and without `backend`, already checked (see the public op in normlib/<norm>.py):
# normalized_shape arrives as a tuple of ints, rms_norm's eps=None as the float it means in torch,
# and weight/bias/running stats as None or tensors of the right shape on input's device.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "batch_norm": {"torch": "normlib.batch_norm:batch_norm_torch"},
    "instance_norm": {"torch": "normlib.instance_norm:instance_norm_torch"},
    "group_norm": {"torch": "normlib.group_norm:group_norm_torch"},
    "layer_norm": {
        "torch": "normlib.layer_norm:layer_norm_torch",
        "triton": "normlib.kernels.layer_norm:layer_norm_triton",
    },
    "add_layer_norm": {
        "torch": "normlib.layer_norm:add_layer_norm_torch",
        "cpu": "normlib.cpu:add_layer_norm_cpu",
        "triton": "normlib.kernels.layer_norm:add_layer_norm_triton",
    },
    "rms_norm": {
        "torch": "normlib.rms_norm:rms_norm_torch",
        "cpu": "normlib.cpu:rms_norm_cpu",
        "triton": "normlib.kernels.rms_norm:rms_norm_triton",
    },
    "add_rms_norm": {
        "torch": "normlib.rms_norm:add_rms_norm_torch",
        "cpu": "normlib.cpu:add_rms_norm_cpu",
        "triton": "normlib.kernels.rms_norm:add_rms_norm_triton",
    },
    "dyt": {
        "torch": "normlib.dyt:dyt_torch",
        "triton": "normlib.kernels.dyt:dyt_triton",
    },
}

# Preference of "auto", per device type: fused first, PyTorch as the fallback that always works.
# Triton is not auto-picked on the CPU even under the interpreter: the interpreter is for testing
# and is orders of magnitude slower than PyTorch.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpu", "torch"),
}


_LOADED: dict[str, Callable] = {}
# (op, backend name or "auto", device) -> the function, for answers that cannot change within a
# process. resolve() runs on every call of every op, and on a small tensor the whole op takes a
# few microseconds: the key is the device object itself because reading device.type or the
# environment would cost more than the rest of the lookup.
_RESOLVED: dict[tuple[str, str, torch.device], Callable] = {}


def _load(target: str) -> Callable:
    # A plain dict rather than functools.cache: torch.compile traces through the public ops, and
    # dynamo warns on every functools.cache-wrapped call it meets.
    function = _LOADED.get(target)
    if function is None:
        module_name, function_name = target.split(":")
        function = _LOADED[target] = getattr(importlib.import_module(module_name), function_name)
    return function


def _why_not(op: str, name: str, device: torch.device) -> str | None:
    if name not in IMPLEMENTATIONS[op]:
        return f"the {name!r} backend has no implementation of {op}"
    backend = BACKENDS[name]
    return backend.unavailable_reason() or backend.unsupported_device_reason(device)


def available_backends(op: str | None = None, device: torch.device | str | None = None) -> list[str]:
    """The backends this machine can run.

    With ``op``, only those implementing it; with ``device``, only those that run tensors there;
    without ``device``, those that run tensors on some device this machine has (the CPU, and CUDA
    when a GPU is visible). ``normlib.available_backends()`` on a laptop gives ``['torch', 'cpu']``;
    on a GPU machine with triton installed it adds ``'triton'``.
    """
    if op is not None and op not in IMPLEMENTATIONS:
        raise ValueError(f"op={op!r} is not one of {sorted(IMPLEMENTATIONS)}")
    ops = [op] if op is not None else list(IMPLEMENTATIONS)
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    found = []
    for name, backend in BACKENDS.items():
        if backend.unavailable_reason() is not None:
            continue
        if not any(name in IMPLEMENTATIONS[o] for o in ops):
            continue
        if all(backend.unsupported_device_reason(d) is not None for d in devices):
            continue
        found.append(name)
    return found


def _by_dtype(function: Callable, dtypes: frozenset[torch.dtype], fallback: Callable) -> Callable:
    """``function`` for inputs of ``dtypes``, ``fallback`` (PyTorch's) for the rest: what "auto"
    runs when its first choice computes some dtypes less precisely than they promise."""

    def run(input: torch.Tensor, *args):
        return (function if input.dtype in dtypes else fallback)(input, *args)

    run.__name__ = f"{function.__name__}_or_torch"
    run.__wrapped__ = function
    return run


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` with ``backend`` on a tensor on ``device``.

    Raises ValueError for a backend name that does not exist and RuntimeError for one that
    exists but cannot run here, listing what can.
    """
    function = _RESOLVED.get((op, backend, device))
    if function is not None:
        return function
    if backend == "auto":
        # What "auto" picks depends only on the op and the device (no backend in AUTO_ORDER
        # depends on Triton's interpreter), so it is worked out once per (op, device).
        name = next((n for n in AUTO_ORDER.get(device.type, ()) if _why_not(op, n, device) is None), "torch")
        function = _load(IMPLEMENTATIONS[op][name])
        if BACKENDS[name].dtypes is not None:
            function = _by_dtype(function, BACKENDS[name].dtypes, _load(IMPLEMENTATIONS[op]["torch"]))
        _RESOLVED[(op, backend, device)] = function
        return function
    if backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not a known backend; expected 'auto' or one of "
            f"{list(BACKENDS)} (available for {op} on {device.type}: "
            f"{available_backends(op, device)})"
        )
    reason = _why_not(op, backend, device)
    if reason is not None:
        raise RuntimeError(
            f"backend={backend!r} cannot run {op} here: {reason}. "
            f"Available for {op} on {device.type}: {available_backends(op, device)}"
        )
    function = _load(IMPLEMENTATIONS[op][backend])
    if backend != "triton":  # whether Triton runs CPU tensors depends on TRITON_INTERPRET, read per call
        _RESOLVED[(op, backend, device)] = function
    return function
