"""Which implementation of a normalization op runs: the one place that decides.

Every public op (``normlib.layer_norm``, ``normlib.rms_norm``, ...) checks its arguments once,
resolves its defaults (``eps=None``), and then asks :func:`resolve` for the function that does the
work. Nothing after that chooses again: an implementation computes, or, called on an input it does
not take, is never reached. Implementations are grouped into *backends*, the names a user passes
as ``backend=``:

``"torch"``
    PyTorch's own ops. Always available, on every device, for every input; the baseline every other
    backend is tested against.
``"cpu"``
    normlib's fused CPU path for the ops where PyTorch's CPU op is an unfused chain (RMSNorm and the
    residual-add + norm ops): C kernels (``normlib/cpu/*.c``), and plain PyTorch where they cannot
    run (no C compiler, float64, a weight of another dtype than the input's).
``"triton"``
    Fused Triton kernels (``normlib/kernels/``) for CUDA tensors, or for CPU tensors when
    ``TRITON_INTERPRET=1`` runs them through Triton's interpreter (how CI tests them).

The table :data:`IMPLEMENTATIONS` lists, per op and backend, its implementations in order of
preference, each with the rule ``supports(input, weight, bias)`` that says which inputs it takes
(``None``) and why not the others (a sentence). :func:`resolve` runs the first implementation of
the backend whose rule says ``None``; with ``backend="auto"`` it walks the backends of
:data:`AUTO_ORDER` for the input's device, so an input a fused kernel would compute less precisely
(float64 on the float32 Triton kernels) reaches PyTorch, while naming that backend for it is an
error. One rule holds for every op: while a torch.func transform is active or ``torch.jit.trace``
records, the op's "torch" implementation runs, whatever the backend (``_torch_ops_only``).

Implementations and rules are named by ``"module:function"`` strings and imported on first use, so
``import normlib`` never imports triton or compiles a C kernel, and works on any machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "IMPLEMENTATIONS",
    "Implementation",
    "TRITON_DTYPES",
    "available_backends",
    "explain_dispatch",
    "interpreter_reason",
    "resolve",
    "triton_device_reason",
]


# ----------------------------------------------------------------------------------------------
# Backends: can this machine run them at all, and on which devices
# ----------------------------------------------------------------------------------------------


def _triton_installed() -> str | None:
    """None if triton can be used, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def interpreter_reason(triton_version: str, numpy_version: str) -> str | None:
    """None if Triton ``triton_version``'s CPU interpreter can run normlib's kernels beside NumPy
    ``numpy_version``, else why not: before Triton 3.7 the interpreter turns a loop bound computed
    from ``tl.program_id`` (the backward kernels' ``range(pid, n_rows, n_programs)``) into a
    Python int through a one-element array, which NumPy 2 refuses. Compiled for a GPU, every
    Triton from 3.2 on builds the kernels (``python -m normlib.kernels.compile_check``)."""

    def major_minor(version: str) -> tuple[int, int]:
        parts = re.match(r"(\d+)\.(\d+)", version)
        return (int(parts[1]), int(parts[2])) if parts else (0, 0)

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 0):
        return (
            f"Triton {triton_version}'s interpreter cannot run normlib's kernels with NumPy "
            f"{numpy_version} (it needs Triton >= 3.7, or NumPy < 2); on a GPU they run compiled"
        )
    return None


_interpreter_checked: list[str | None] = []  # [reason] once worked out: it cannot change in a process


def _installed_interpreter_reason() -> str | None:
    if not _interpreter_checked:
        from importlib.metadata import version

        _interpreter_checked.append(interpreter_reason(version("triton"), version("numpy")))
    return _interpreter_checked[0]


def triton_device_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run tensors on ``device``, else why not.

    CUDA tensors run compiled kernels. CPU tensors run only under Triton's interpreter, which
    ``@triton.jit`` chooses when a kernel is defined: once normlib's kernels are imported their
    mode is fixed (``normlib.kernels._rows.INTERPRETED``); before, ``TRITON_INTERPRET`` decides.
    """
    if device.type == "cuda":
        return None
    kernels = sys.modules.get("normlib.kernels._rows")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1" if kernels is None else kernels.INTERPRETED
    if device.type == "cpu" and interpreted:
        return _installed_interpreter_reason()
    compiled = "" if kernels is None or kernels.INTERPRETED else (
        "; normlib's kernels were already imported compiled for the GPU, so set it before the first import"
    )
    return (
        f"the 'triton' backend runs CUDA tensors (or CPU tensors when the environment variable "
        f"TRITON_INTERPRET=1 is set before triton is imported{compiled}); got a tensor on {device.type!r}"
    )


def _cpu_device(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    return f"the 'cpu' backend runs CPU tensors; got a tensor on {device.type!r}"


def _always(*_args) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """A family of implementations and the machines and devices it can run on.

    Both checks return ``None`` when fine and otherwise a sentence saying why not, so the error a
    user sees explains what to change.
    """

    name: str
    unavailable_reason: Callable[[], str | None]
    unsupported_device_reason: Callable[[torch.device], str | None]


#: The names a user can pass as ``backend=`` besides "auto", and where each can run.
BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", _always, _always),
    # always available: without a C compiler its ops run plain PyTorch (normlib/cpu/blocked.py)
    "cpu": Backend("cpu", _always, _cpu_device),
    "triton": Backend("triton", _triton_installed, triton_device_reason),
}


# ----------------------------------------------------------------------------------------------
# Implementations: which inputs each one takes
# ----------------------------------------------------------------------------------------------
# A rule takes (input, weight, bias) -- None for a parameter the op or the call does without -- and
# returns None if the implementation computes that input as documented, else why not. Rules run on
# every call, so they only compare.

#: The input dtypes the Triton kernels take. They hold their statistics and arithmetic in float32,
#: so a float64 input would be computed to float32's precision and returned as float64 that looks
#: exact but is not.
TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _triton_dtype_reason(dtype: torch.dtype) -> str | None:
    if dtype in TRITON_DTYPES:
        return None
    return (
        f"the 'triton' kernels compute in float32 and take float16, bfloat16 or float32 input, "
        f"got {dtype}; use backend='torch' (backend='auto' sends {dtype} there)"
    )


def triton_kernels_take(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    """The row-norm Triton kernels: float16/bfloat16/float32 input with at least one element."""
    reason = _triton_dtype_reason(input.dtype)
    if reason is None and input.numel() == 0:
        return "an empty input leaves nothing to launch"
    return reason


def triton_empty_input(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    """An empty input of a dtype the Triton backend takes: PyTorch's op returns the empty result."""
    return _triton_dtype_reason(input.dtype) or (None if input.numel() == 0 else "the input is not empty")


def triton_dtypes(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    return _triton_dtype_reason(input.dtype)


_native: object | None = None  # normlib.cpu.native, imported on the first CPU call that asks


def _c_kernels_take(kernels: str, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    global _native
    if _native is None:
        from normlib.cpu import native as _native  # noqa: PLW0603 -- imported once, on first use
    if not _native.supports(input.dtype, kernels):
        return _native.unavailable_reason(kernels) or (
            f"normlib's C {kernels} kernels do not store {input.dtype} on this machine"
        )
    if (weight is not None and weight.dtype != input.dtype) or (bias is not None and bias.dtype != input.dtype):
        return "the C kernels take weight and bias in the input's dtype"
    return None


def c_rms_norm_kernels_take(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    """normlib/cpu/rms_norm.c: float32, bfloat16, float16 (where the compiler has _Float16), with
    a weight of the input's dtype, once the kernels are built."""
    return _c_kernels_take("rms_norm", input, weight, None)


def c_layer_norm_kernels_take(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    """normlib/cpu/layer_norm.c: as :func:`c_rms_norm_kernels_take`, bias included."""
    return _c_kernels_take("layer_norm", input, weight, bias)


def real_input(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    return "the input is complex" if input.is_complex() else None


def complex_input(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> str | None:
    return None if input.is_complex() else "the input is real"


@dataclass(frozen=True)
class Implementation:
    """One function that computes an op, and the inputs it takes.

    ``function`` takes the op's arguments positionally, in the public op's order and without
    ``backend``, already checked and with defaults resolved (see the public op in
    normlib/<norm>.py): normalized_shape as a tuple of ints, rms_norm's ``eps=None`` as the float it
    means in torch, weight/bias/running stats as None or tensors of the right shape on input's
    device.
    """

    function: str  # "module:function"
    supports: Callable[[Tensor, Tensor | None, Tensor | None], str | None] = _always


def _only(function: str) -> tuple[Implementation, ...]:
    return (Implementation(function),)


#: For each op, each backend's implementations of it in order of preference (op, then backend
#: name, then a tuple of :class:`Implementation`). :func:`resolve` runs the first whose rule takes
#: the input.
IMPLEMENTATIONS: dict[str, dict[str, tuple[Implementation, ...]]] = {
    "batch_norm": {"torch": _only("normlib.batch_norm:batch_norm_torch")},
    "instance_norm": {"torch": _only("normlib.instance_norm:instance_norm_torch")},
    "group_norm": {"torch": _only("normlib.group_norm:group_norm_torch")},
    "layer_norm": {
        "torch": _only("normlib.layer_norm:layer_norm_torch"),
        "triton": (
            Implementation("normlib.kernels.layer_norm:layer_norm_triton", triton_kernels_take),
            Implementation("normlib.layer_norm:layer_norm_torch", triton_empty_input),
        ),
    },
    "add_layer_norm": {
        "torch": _only("normlib.layer_norm:add_layer_norm_torch"),
        "cpu": (
            Implementation("normlib.cpu:add_layer_norm_c", c_layer_norm_kernels_take),
            # PyTorch's LayerNorm kernels with the add in the same graph node
            Implementation("normlib.cpu:add_layer_norm_aten"),
        ),
        "triton": (
            Implementation("normlib.kernels.layer_norm:add_layer_norm_triton", triton_kernels_take),
            Implementation("normlib.layer_norm:add_layer_norm_torch", triton_empty_input),
        ),
    },
    "rms_norm": {
        "torch": _only("normlib.rms_norm:rms_norm_torch"),
        "cpu": (
            Implementation("normlib.cpu:rms_norm_c", c_rms_norm_kernels_take),
            Implementation("normlib.cpu:rms_norm_blocked", real_input),
            # the kernels are real-valued; PyTorch's op takes complex input (as torch.nn.RMSNorm)
            Implementation("normlib.rms_norm:rms_norm_torch", complex_input),
        ),
        "triton": (
            Implementation("normlib.kernels.rms_norm:rms_norm_triton", triton_kernels_take),
            Implementation("normlib.rms_norm:rms_norm_torch", triton_empty_input),
        ),
    },
    "add_rms_norm": {
        "torch": _only("normlib.rms_norm:add_rms_norm_torch"),
        "cpu": (
            Implementation("normlib.cpu:add_rms_norm_c", c_rms_norm_kernels_take),
            Implementation("normlib.cpu:add_rms_norm_blocked"),
        ),
        "triton": (
            Implementation("normlib.kernels.rms_norm:add_rms_norm_triton", triton_kernels_take),
            Implementation("normlib.rms_norm:add_rms_norm_torch", triton_empty_input),
        ),
    },
    "dyt": {
        "torch": _only("normlib.dyt:dyt_torch"),
        "triton": (Implementation("normlib.kernels.dyt:dyt_triton", triton_dtypes),),
    },
}

#: The backends "auto" tries for each device type, fused first and PyTorch last, as the fallback
#: that always works. Triton is not auto-picked on the CPU even under the interpreter, which is for
#: testing and is orders of magnitude slower than PyTorch.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "torch"),
    "cpu": ("cpu", "torch"),
}


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------

_LOADED: dict[str, Callable] = {}
# (op, backend name or "auto", device) -> the candidates, (backend, implementation, function) in
# order, for answers that cannot change within a process. resolve() runs on every call of every op,
# and on a small tensor the whole op takes a few microseconds: the key is the device object itself
# because reading device.type would cost more than the rest of the lookup.
_CANDIDATES: dict[tuple[str, str, torch.device], tuple[tuple[str, Implementation, Callable], ...]] = {}


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
    on a GPU machine with triton installed it adds ``'triton'``. Whether a backend takes a given
    input (its dtype, say) is :data:`IMPLEMENTATIONS`' rules' to say, at the call.
    """
    if op is not None and op not in IMPLEMENTATIONS:
        raise ValueError(f"op={op!r} is not one of {sorted(IMPLEMENTATIONS)}")
    ops = [op] if op is not None else list(IMPLEMENTATIONS)
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [
        name
        for name in BACKENDS
        if any(_why_not(o, name, d) is None for o in ops for d in devices)
    ]


def _candidates(op: str, backend: str, device: torch.device) -> tuple[tuple[str, Implementation, Callable], ...]:
    """The implementations ``resolve`` may run, in order, for ``backend`` on ``device``."""
    found = _CANDIDATES.get((op, backend, device))
    if found is not None:
        return found
    if backend == "auto":
        names = [n for n in AUTO_ORDER.get(device.type, ()) if _why_not(op, n, device) is None]
        if "torch" not in names:
            names.append("torch")
    else:
        if op not in IMPLEMENTATIONS:
            raise ValueError(f"op={op!r} is not one of {sorted(IMPLEMENTATIONS)}")
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
        names = [backend]
    found = tuple((name, impl, _load(impl.function)) for name in names for impl in IMPLEMENTATIONS[op][name])
    # Whether Triton runs CPU tensors is fixed once its kernels are imported (loading them above did).
    if "triton" not in names or device.type == "cuda" or "normlib.kernels._rows" in sys.modules:
        _CANDIDATES[(op, backend, device)] = found
    return found


def _torch_ops_only() -> bool:
    """Whether only PyTorch's ops may run: a fused kernel is opaque to torch.func's transforms
    (``grad``, ``vmap``: no batched or wrapped tensor reaches a C or Triton kernel) and to
    ``torch.jit.trace`` (it cannot record what a C extension does). While torch.compile traces,
    the kernels' registered fake implementations stand in for them instead."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or torch._C._is_tracing()


def resolve(
    op: str, backend: str, input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
) -> Callable:
    """The function that runs ``op`` with ``backend`` on ``input`` (and its ``weight``, ``bias``).

    Raises ValueError for a backend name that does not exist, RuntimeError for one that exists but
    cannot run here (listing what can), and TypeError for one that cannot take this input (its
    dtype, say), with the rule's reason.
    """
    candidates = _candidates(op, backend, input.device)
    for name, implementation, function in candidates:
        if implementation.supports(input, weight, bias) is None:
            if name != "torch" and _torch_ops_only():
                return _load(IMPLEMENTATIONS[op]["torch"][0].function)
            return function
    reason = candidates[0][1].supports(input, weight, bias)  # the preferred implementation's reason
    raise TypeError(f"backend={backend!r} cannot run this input: {reason}")


def explain_dispatch(
    op: str,
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    backend: str = "auto",
) -> str:
    """What :func:`resolve` runs for this call, and why not each other implementation of ``op``.

    One line per implementation in :data:`IMPLEMENTATIONS`, backends in the order ``backend``
    would try them (for "auto", :data:`AUTO_ORDER` then the rest), each with its verdict: the one
    that runs, the ones its backend cannot run here, the ones whose rule refuses this input (with
    the rule's reason), and the ones never reached. For example, a bfloat16 input with a float32
    weight on the CPU::

        >>> print(normlib.explain_dispatch("rms_norm", x.bfloat16(), weight.float()))

    shows that the C kernels refuse it (they take the weight in the input's dtype) and that the
    cpu backend's blocked PyTorch path runs instead.
    """
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"op={op!r} is not one of {sorted(IMPLEMENTATIONS)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a known backend; expected 'auto' or one of {list(BACKENDS)}")
    device = input.device
    try:
        chosen: Callable | None = resolve(op, backend, input, weight, bias)
        outcome = f"runs {chosen.__module__}:{chosen.__name__}"
    except (RuntimeError, TypeError) as error:
        chosen, outcome = None, f"raises {type(error).__name__}: {error}"
    tried = list(AUTO_ORDER.get(device.type, ())) + ["torch"] if backend == "auto" else [backend]
    order = list(dict.fromkeys(tried + list(IMPLEMENTATIONS[op])))
    parameters = ", ".join(
        f"{name} {p.dtype}" for name, p in (("weight", weight), ("bias", bias)) if p is not None
    )
    lines = [
        f"{op}(input {input.dtype} {tuple(input.shape)} on {device.type}"
        f"{', ' + parameters if parameters else ''}, backend={backend!r}) {outcome}"
    ]
    found = False
    for name in order:
        if name not in IMPLEMENTATIONS[op]:
            continue
        reason = _why_not(op, name, device)
        for implementation in IMPLEMENTATIONS[op][name]:
            target = implementation.function
            if name not in tried:
                verdict = "not tried: " + ("'auto' does not try it on " + device.type if backend == "auto" else "another backend was named")
            elif reason is not None:
                verdict = f"cannot run here: {reason}"
            elif found:
                verdict = "not reached"
            else:
                refusal = implementation.supports(input, weight, bias)
                if refusal is None:
                    found = True
                    runs = chosen is not None and f"{chosen.__module__}:{chosen.__name__}" == target
                    verdict = "runs" if runs else "takes the input, but a torch.func transform or torch.jit.trace is active: PyTorch's op runs"
                else:
                    verdict = f"refuses this input: {refusal}"
            lines.append(f"  {name:7s} {target:48s} {verdict}")
    return "\n".join(lines)
