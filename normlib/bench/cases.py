"""What the benchmark measures: the cases, the byte model, the implementations and their inputs.

A *case* is one op on one tensor, in one pass (forward, or forward and backward). Every
implementation of a case is charged the same bytes (:func:`bytes_moved`), so effective bandwidths
compare like times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import normlib

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dyt")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
LAYER_NORM_EPS = 1e-5
DYT_ALPHA = 0.5  # alpha's initial value in the DyT paper (Zhu et al., 2025)

# The per-feature parameters each op reads (and, backward, writes gradients of).
PARAMETERS = {"layer_norm": ("weight", "bias"), "rms_norm": ("weight",), "add_layer_norm": ("weight", "bias"),
              "add_rms_norm": ("weight",), "dyt": ("weight", "bias")}

# Implementation labels that the reports look up.
FUNCTIONAL = "torch.nn.functional"
EAGER = "torch eager"
NORMLIB_CPU = "normlib cpu"
TRITON = "triton"
COMPOSITE = "composite"
COMPILED = "torch.compile"
LIGER = "liger"
BACKEND_LABELS = {"torch": EAGER, "cpu": NORMLIB_CPU, "triton": TRITON}

CaseKey = tuple[str, int, int, str]  # (dtype, hidden, rows, mode): the same tensor for every op


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    hidden: int
    rows: int
    mode: str

    @property
    def tensor(self) -> CaseKey:
        """(dtype, hidden, rows, mode): what the cases of different ops on the same tensor share."""
        return (self.dtype, self.hidden, self.rows, self.mode)


def case_name(op: str, key: CaseKey) -> str:
    """How progress lines and reports name a case: op, dtype, the tensor's rows x hidden, mode."""
    dtype, hidden, rows, mode = key
    return f"{op} {dtype} {rows}x{hidden} {mode}"


def bytes_moved(op: str, rows: int, hidden: int, element_size: int, mode: str) -> int:
    """The bytes an ideal fused kernel must read and write: the byte model behind "bandwidth".

    Forward: read x (and the residual r), read the weight (and bias), write y (and h = x + r).
    Backward, added in "fwd+bwd" mode: read the saved x (or h), dy (and dh, the gradient of h),
    the weight; write dx (the residual's gradient is the same tensor), dw (and db). Per-row
    statistics (two fp32 numbers a row, under 1% of a row of 1K elements) are left out. Every
    implementation is charged the same bytes, so bandwidths compare like times; an unfused chain
    that moves more memory shows up as a lower *effective* bandwidth.
    """
    elements = rows * hidden
    streams = 2 if op.startswith("add_") else 1  # x alone, or x and r (and then y and h, dy and dh)
    params = len(PARAMETERS[op])  # weight and bias, or weight only
    forward = (2 * streams * elements + params * hidden) * element_size
    if mode == "fwd":
        return forward
    backward = ((streams + 1) * elements + elements + hidden + params * hidden) * element_size
    return forward + backward


def case_memory_bytes(case: Case) -> int:
    """An estimate of the memory a case's tensors take, for the memory budget: the inputs and
    outputs (x, y; and r, h for the add_* ops), and in fwd+bwd mode as many again for the upstream
    gradients and the input gradients. Weights and an implementation's own intermediates are left
    out, so the real peak is higher (the composite's float32 temporaries, for instance)."""
    streams = 2 if case.op.startswith("add_") else 1
    tensors = 2 * streams if case.mode == "fwd" else 4 * streams
    return tensors * case.rows * case.hidden * DTYPES[case.dtype].itemsize


# ------------------------------------------------------------------------------------------------
# The implementations
# ------------------------------------------------------------------------------------------------


def layer_norm_composite(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm as plain torch operations: what torch.compile fuses, and eagerly one pass per op."""
    x32 = x.float()  # (rows, hidden)
    mean = x32.mean(-1, keepdim=True)  # (rows, 1)
    centered = x32 - mean
    var = centered.pow(2).mean(-1, keepdim=True)  # (rows, 1)
    return (centered * torch.rsqrt(var + LAYER_NORM_EPS) * weight + bias).to(x.dtype)


def rms_norm_composite(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm as plain torch operations, eps=None meaning float32's epsilon as in torch."""
    x32 = x.float()  # (rows, hidden)
    mean_square = x32.pow(2).mean(-1, keepdim=True)  # (rows, 1)
    return (x32 * torch.rsqrt(mean_square + torch.finfo(torch.float32).eps) * weight).to(x.dtype)


def add_layer_norm_composite(x, residual, weight, bias):
    h = x + residual
    return layer_norm_composite(h, weight, bias), h


def add_rms_norm_composite(x, residual, weight):
    h = x + residual
    return rms_norm_composite(h, weight), h


def dyt_composite(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """DyT as plain torch operations: weight * tanh(alpha * x) + bias, in float32."""
    return (torch.tanh(alpha * x.float()) * weight + bias).to(x.dtype)


COMPOSITES: dict[str, Callable] = {
    "layer_norm": layer_norm_composite,
    "rms_norm": rms_norm_composite,
    "add_layer_norm": add_layer_norm_composite,
    "add_rms_norm": add_rms_norm_composite,
    "dyt": dyt_composite,
}

# PyTorch's own ops, called directly: the yardsticks. The add_* ops and DyT have none.
FUNCTIONALS: dict[str, Callable] = {
    "layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, LAYER_NORM_EPS),
    "rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, None),
}


def op_unavailable_reason(op: str) -> Optional[str]:
    """None when this normlib has ``op``, else why the op's cases are skipped."""
    if not hasattr(normlib, op):
        return f"normlib has no {op}() in this version"
    return None


def normlib_call(op: str, backend: str) -> Callable:
    """The normlib op with a fixed backend, taking the same tensors as the composite."""
    hidden_shape = lambda x: (x.shape[-1],)  # noqa: E731
    if op == "layer_norm":
        return lambda x, w, b: normlib.layer_norm(x, hidden_shape(x), w, b, LAYER_NORM_EPS, backend=backend)
    if op == "rms_norm":
        return lambda x, w: normlib.rms_norm(x, hidden_shape(x), w, None, backend=backend)
    if op == "add_layer_norm":
        return lambda x, r, w, b: normlib.add_layer_norm(x, r, hidden_shape(x), w, b, LAYER_NORM_EPS, backend=backend)
    if op == "add_rms_norm":
        return lambda x, r, w: normlib.add_rms_norm(x, r, hidden_shape(x), w, None, backend=backend)
    if op == "dyt":
        return lambda x, a, w, b: normlib.dyt(x, a, w, b, backend=backend)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def normlib_backends(op: str, device: torch.device, interpreted: bool = False) -> list[str]:
    """The backends normlib can run ``op`` with on ``device``, "torch" first; the Triton backend
    only on a GPU, unless ``interpreted``: its CPU interpreter is a correctness tool, orders of
    magnitude too slow to time, run only to check that a benchmark's plumbing works."""
    backends = normlib.available_backends(op, device)
    return [b for b in sorted(backends, key=lambda name: name != "torch")
            if b != "triton" or device.type == "cuda" or interpreted]


def implementations(op: str, device: torch.device, compile: bool,
                    peers: Optional[dict[str, Callable]] = None, interpreted: bool = False) -> dict[str, Callable]:
    """label -> function for everything that can run ``op`` on ``device``: torch.nn.functional
    first (where the op has one), then torch eager, the other backends (Triton's interpreter too
    with ``interpreted``), the composite, its ``torch.compile`` (with ``compile``), and ``peers``
    (other libraries' implementations)."""
    found = {FUNCTIONAL: FUNCTIONALS[op]} if op in FUNCTIONALS else {}
    for backend in normlib_backends(op, device, interpreted):
        found[BACKEND_LABELS.get(backend, backend)] = normlib_call(op, backend)
    found[COMPOSITE] = COMPOSITES[op]
    if compile:
        found[COMPILED] = torch.compile(COMPOSITES[op], dynamic=False)
    found.update(peers or {})
    return found


def baseline_of(labels: Sequence[str]) -> Optional[str]:
    """The implementation speed-ups are relative to: PyTorch's functional op where the op has one,
    else torch eager (normlib's op on PyTorch's ops, for the add_* ops and DyT)."""
    return next((label for label in (FUNCTIONAL, EAGER) if label in labels), None)


def make_inputs(case: Case, device: torch.device, residual: bool) -> dict[str, torch.Tensor]:
    """Seeded tensors of ``case``'s size and dtype, shared by all the ops timed on it (one set of
    tensors, not one per op): "x", "weight" (near 1, as after initialization), "bias", "alpha"
    (DyT's scalar, float32), with ``residual`` a "residual"; in fwd+bwd mode these require grad,
    and "dy" and "dh" are the upstream gradients of the outputs y and h = x + residual."""
    generator = torch.Generator(device=device).manual_seed(0)
    backward = case.mode != "fwd"

    def tensor(shape, scale=1.0, offset=0.0, requires_grad=backward, dtype=DTYPES[case.dtype]):
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale + offset
        return t.to(dtype).requires_grad_(requires_grad)

    tensors = {"x": tensor((case.rows, case.hidden)), "weight": tensor((case.hidden,), 0.1, 1.0),
               "bias": tensor((case.hidden,), 0.1),
               "alpha": tensor((1,), 0.0, DYT_ALPHA, dtype=torch.float32)}
    if residual:
        tensors["residual"] = tensor((case.rows, case.hidden))
    for name in (["dy", "dh"] if residual else ["dy"]) if backward else []:
        tensors[name] = tensor((case.rows, case.hidden), requires_grad=False)
    return tensors


def op_inputs(op: str, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The arguments of ``op`` (and of its implementations) among :func:`make_inputs`' tensors."""
    names = ["x", "residual"] if op.startswith("add_") else ["x", "alpha"] if op == "dyt" else ["x"]
    return [tensors[name] for name in names + list(PARAMETERS[op])]


def timed_step(fn: Callable, inputs: list[torch.Tensor], mode: str,
               upstream: Optional[Sequence[torch.Tensor]] = None) -> Callable[[], object]:
    """A closure running one forward (and backward, with the gradients ``upstream`` of the outputs,
    random when None) of ``fn`` on ``inputs``."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = list(upstream[: len(outputs)]) if upstream is not None else [torch.randn_like(o) for o in outputs]

    def forward_backward():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        # autograd.grad, not backward(): nothing accumulates into .grad between repeats.
        return torch.autograd.grad(out, inputs, upstream)

    return forward_backward
