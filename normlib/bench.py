"""The benchmark: every available implementation of LayerNorm and RMSNorm, side by side.

    python -m normlib.bench                      # all ops, bf16 and fp32, hidden 1K..32K
    python -m normlib.bench --quick              # a tiny configuration (seconds, on a CPU)
    python -m normlib.bench --cpu-grid           # the CPU-path issue's grid and its targets
    python -m normlib.bench --ops rms_norm --dtypes bf16 --hidden 4096 8192 --rows 1 4096 --modes fwd
    python -m normlib.bench --help

For each case (op, dtype, hidden size, rows, mode) it times, on one device:

* "torch.nn.functional": PyTorch's own op called directly, ``F.layer_norm`` or ``F.rms_norm``
  (the add_* ops have no functional twin). It is the baseline of the speed-up column;
* every backend in ``normlib.available_backends(op, device)``: ``"torch"`` is shown as
  "torch eager" (PyTorch's op behind normlib's Python dispatch, so its time over the functional
  op's is that dispatch's overhead); ``"cpu"`` and ``"triton"`` appear when they can run there
  (Triton's CPU interpreter is a correctness tool and is never timed);
* "composite": the op written as plain torch operations, run eagerly (one kernel per operation);
* "torch.compile": that composite compiled by ``torch.compile`` (on by default on a GPU, off on
  the CPU where the first compile takes tens of seconds; ``--compile`` / ``--no-compile``).

All the implementations of all the ops on one tensor are timed in alternation (see
:func:`time_interleaved` and :func:`run_benchmark`), and each time is the median of all its runs:
``--repeats`` of them, or on the CPU by default as many as fill about 0.2 s
(:func:`adaptive_repeats`). It prints a table (median time, effective bandwidth, fraction of the
device's peak bandwidth, speed-up over the baseline), then RMSNorm's and LayerNorm's times relative
to ``F.layer_norm`` and, on the CPU, the targets of the CPU-path issue checked case by case; it
writes the table as CSV and JSON. Speed is printed, as ratios within one run, and
never asserted.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F

import normlib
from normlib.book.timing import median_time

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
LAYER_NORM_EPS = 1e-5
Key = TypeVar("Key", bound=Hashable)

# Implementation labels that the reports below look up.
FUNCTIONAL = "torch.nn.functional"
EAGER = "torch eager"
NORMLIB_CPU = "normlib cpu"
BACKEND_LABELS = {"torch": EAGER, "cpu": NORMLIB_CPU, "triton": "triton"}

# The targets of the CPU-path issue, checked by rms_norm_targets() on every CPU run. normlib's CPU
# RMSNorm (backend "cpu", what backend="auto" picks on the CPU) against PyTorch's functional ops
# on the same tensor: its time at most this multiple of F.layer_norm's, per mode ...
RMS_NORM_MAX_TIME_VS_LAYER_NORM = {"fwd": 1.25, "fwd+bwd": 1.3}
# ... and at least this many times faster than F.rms_norm.
RMS_NORM_MIN_SPEEDUP_OVER_F_RMS_NORM = 2.0
# LayerNorm on the CPU: normlib's op no slower than F.layer_norm, within this ratio at large sizes
# (at small sizes, normlib's dispatch overhead in microseconds is what matters). Printed, not marked.
LAYER_NORM_MAX_TIME_VS_F_LAYER_NORM = 1.05

# Adaptive repeats (repeats=None): enough runs for a measurement of about this long, so that a
# microsecond-sized case gets hundreds of samples while a 16384 x 8192 one is not run for minutes.
TARGET_MEASUREMENT_SECONDS = 0.2
MIN_REPEATS, MAX_REPEATS = 5, 1000
WARMUP_CALLS = 3  # at most; two when the calls are slow (see time_interleaved)
ROUNDS = 3  # rounds of alternation between the implementations timed on one tensor
CPU_MEMORY_BUDGET_GIB = 2.0  # default --memory-budget on the CPU (a GPU has no default budget)

# Peak DRAM bandwidth in GB/s (1 GB = 1e9 bytes) from the vendors' datasheets, matched against
# torch.cuda.get_device_name(). Order matters: the first pattern that matches wins, so specific
# variants come before the family name.
PEAK_BANDWIDTH_GBPS: tuple[tuple[str, float], ...] = (
    (r"H200", 4800.0),  # H200 SXM, HBM3e
    (r"H100.*PCIe", 2000.0),  # H100 PCIe, HBM2e
    (r"H100.*NVL", 3900.0),  # H100 NVL, per GPU
    (r"H100", 3350.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3"), HBM3
    (r"A100.*80GB.*PCIe", 1935.0),  # A100 80GB PCIe
    (r"A100.*80GB", 2039.0),  # A100 80GB SXM4
    (r"A100", 1555.0),  # A100 40GB (SXM4 and PCIe)
    (r"\bL4\b", 300.0),  # L4, GDDR6
    (r"\bT4\b", 320.0),  # T4, GDDR6
    (r"\bA10G?\b", 600.0),  # A10 and A10G, GDDR6
    (r"V100", 900.0),  # V100 (16/32GB, SXM2 and PCIe)
    (r"RTX 4090", 1008.0),  # GeForce RTX 4090, GDDR6X
)


# ------------------------------------------------------------------------------------------------
# What is measured
# ------------------------------------------------------------------------------------------------


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


@dataclass
class Result:
    op: str
    dtype: str
    hidden: int
    rows: int
    mode: str
    implementation: str
    seconds: float
    bytes_moved: int
    bandwidth_gbps: float
    peak_fraction: Optional[float]  # bandwidth / peak, None when the peak is unknown
    speedup: Optional[float]  # the baseline's time / this time; None without a baseline
    baseline: Optional[str] = None  # the implementation speedup is relative to (see baseline_of)

    tensor = Case.tensor


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
    params = 2 if op.endswith("layer_norm") else 1  # weight and bias, or weight only
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


def peak_bandwidth_gbps(name: str) -> tuple[Optional[float], str]:
    """(peak GB/s, where it comes from) for a GPU named ``name`` (``torch.cuda.get_device_name``)
    from the datasheet table; (None, why) when it is not in the table. For the CPU see
    :func:`measure_copy_bandwidth`."""
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, name):
            return gbps, f"datasheet peak for {name}"
    return None, f"{name} is not in normlib.bench.PEAK_BANDWIDTH_GBPS"


def measure_copy_bandwidth(device: torch.device, megabytes: int = 64, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on a tensor of ``megabytes``: read + write, the attainable
    bandwidth on a CPU (there is no datasheet peak to compare with)."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeat=repeats, warmup=2)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


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


COMPOSITES: dict[str, Callable] = {
    "layer_norm": layer_norm_composite,
    "rms_norm": rms_norm_composite,
    "add_layer_norm": add_layer_norm_composite,
    "add_rms_norm": add_rms_norm_composite,
}

# PyTorch's own ops, called directly: the yardsticks. The add_* ops have none.
FUNCTIONALS: dict[str, Callable] = {
    "layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, LAYER_NORM_EPS),
    "rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, None),
}


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
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def implementations(op: str, device: torch.device, compile: bool) -> dict[str, Callable]:
    """label -> function for everything that can run ``op`` on ``device``: torch.nn.functional
    first (where the op has one), then torch eager, the other backends, the composite."""
    found = {FUNCTIONAL: FUNCTIONALS[op]} if op in FUNCTIONALS else {}
    backends = normlib.available_backends(op, device)
    for backend in sorted(backends, key=lambda name: name != "torch"):
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter: for tests, orders of magnitude slower than anything here
        found[BACKEND_LABELS.get(backend, backend)] = normlib_call(op, backend)
    found["composite"] = COMPOSITES[op]
    if compile:
        found["torch.compile"] = torch.compile(COMPOSITES[op], dynamic=False)
    return found


def baseline_of(labels: Sequence[str]) -> Optional[str]:
    """The implementation speed-ups are relative to: PyTorch's functional op where the op has one,
    else torch eager (normlib's op on PyTorch's ops, for the add_* ops)."""
    return next((label for label in (FUNCTIONAL, EAGER) if label in labels), None)


def make_inputs(case: Case, device: torch.device, residual: bool) -> dict[str, torch.Tensor]:
    """Seeded tensors of ``case``'s size and dtype, shared by all the ops timed on it (one set of
    tensors, not one per op): "x", "weight" (near 1, as after initialization), "bias", with
    ``residual`` a "residual"; in fwd+bwd mode these require grad, and "dy" and "dh" are the
    upstream gradients of the outputs y and h = x + residual."""
    generator = torch.Generator(device=device).manual_seed(0)
    backward = case.mode != "fwd"

    def tensor(shape, scale=1.0, offset=0.0, requires_grad=backward):
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale + offset
        return t.to(DTYPES[case.dtype]).requires_grad_(requires_grad)

    tensors = {"x": tensor((case.rows, case.hidden)), "weight": tensor((case.hidden,), 0.1, 1.0),
               "bias": tensor((case.hidden,), 0.1)}
    if residual:
        tensors["residual"] = tensor((case.rows, case.hidden))
    for name in (["dy", "dh"] if residual else ["dy"]) if backward else []:
        tensors[name] = tensor((case.rows, case.hidden), requires_grad=False)
    return tensors


def op_inputs(op: str, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The arguments of ``op`` (and of its implementations) among :func:`make_inputs`' tensors."""
    names = ["x", "residual"] if op.startswith("add_") else ["x"]
    return [tensors[name] for name in names + (["weight", "bias"] if op.endswith("layer_norm") else ["weight"])]


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


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def adaptive_repeats(
    seconds_per_call: float,
    target_seconds: float = TARGET_MEASUREMENT_SECONDS,
    minimum: int = MIN_REPEATS,
    maximum: int = MAX_REPEATS,
) -> int:
    """How many timed runs make a measurement of about ``target_seconds``, given one call's time,
    within [minimum, maximum]: never fewer than a median needs, never thousands of tiny runs."""
    if not seconds_per_call > 0:  # below the clock's resolution: as fast as it gets
        return maximum
    return max(minimum, min(maximum, math.ceil(target_seconds / seconds_per_call)))


def time_interleaved(
    steps: dict[Key, Callable[[], object]],
    repeats: Optional[int],
    *,
    rounds: int = ROUNDS,
    sync: Callable[[], None] = lambda: None,
) -> dict[Key, float]:
    """key -> median seconds of each step, the steps timed in alternation.

    Why alternate: on a shared machine the load of other processes comes and goes over seconds.
    Timed one after another, one implementation can catch a busy stretch that the next one misses,
    and their ratio -- what this benchmark reports -- is off. Here every step is warmed up, then
    ``rounds`` rounds each run every step for its share of the repeats, so all steps sample the
    same stretches; the median of all a step's samples drops the runs that were interrupted.

    ``repeats=None`` chooses each step's number of runs with :func:`adaptive_repeats` from its
    fastest warm-up call. Warm-up (WARMUP_CALLS calls) stops after two once the second took
    TARGET_MEASUREMENT_SECONDS: a call that slow needs no warm cache, and the biggest cases would
    otherwise spend minutes warming up.
    ``sync`` waits for the device (CUDA runs asynchronously) before the clock is read.
    """

    def run(step: Callable[[], object]) -> float:
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    sync()
    counts = {}
    for label, step in steps.items():
        warmup: list[float] = []
        # At least two calls: a first call can carry one-time costs (the process's first backward,
        # a compile) that would pass for the step's own time.
        while len(warmup) < 2 or (len(warmup) < WARMUP_CALLS and sum(warmup[1:]) < TARGET_MEASUREMENT_SECONDS):
            warmup.append(run(step))
        counts[label] = repeats if repeats is not None else adaptive_repeats(min(warmup))
    samples: dict[Key, list[float]] = {label: [] for label in steps}
    for round_index in range(rounds):
        for label, step in steps.items():
            share = counts[label] // rounds + (round_index < counts[label] % rounds)
            samples[label].extend(run(step) for _ in range(share))
    return {label: statistics.median(times) for label, times in samples.items()}


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def run_benchmark(
    ops: Sequence[str],
    dtypes: Sequence[str],
    hidden_sizes: Sequence[int],
    rows: Union[int, Sequence[int]],
    modes: Sequence[str],
    *,
    device: torch.device,
    repeats: Optional[int] = 20,
    compile: bool = False,
    peak_gbps: Optional[float] = None,
    memory_budget_bytes: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = print,
) -> list[Result]:
    """Time every implementation on every (op, dtype, hidden size, row count, mode) case.

    The cases of all ops on one tensor (dtype, hidden, rows, mode) are timed together, in one
    :func:`time_interleaved` group on shared tensors: the reports compare ops with each other
    (RMSNorm against F.layer_norm), and those ratios deserve the same fairness as the ones within
    an op. Results come back in case order (op, dtype, hidden, rows, mode).

    ``repeats=None`` picks each measurement's runs adaptively (:func:`adaptive_repeats`). Cases
    whose tensors would take more than ``memory_budget_bytes`` (:func:`case_memory_bytes`) are
    skipped with a note, printed even when ``progress`` is None. ``progress`` gets one line per
    case with its times.
    """
    row_counts = [rows] if isinstance(rows, int) else list(rows)
    cases = [Case(op, dtype, hidden, n, mode) for op in ops for dtype in dtypes for hidden in hidden_sizes
             for n in row_counts for mode in modes]
    groups: dict[CaseKey, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.tensor, []).append(case)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    by_case: dict[Case, list[Result]] = {}
    done = 0
    for group in groups.values():
        runnable = []
        for case in group:
            needed, budget = case_memory_bytes(case) / 2**30, (memory_budget_bytes or math.inf) / 2**30
            if needed > budget:
                done += 1
                (progress or print)(f"[{done}/{len(cases)}] {case_name(case.op, case.tensor)}: skipped, its tensors "
                                    f"would take {needed:.2f} GiB, over the memory budget of {budget:.2f} GiB")
            else:
                runnable.append(case)
        if not runnable:
            continue
        if compile:
            # A fresh cache for every group: dynamo recompiles a function for each new shape and
            # dtype, and past its recompile limit (8) it would silently run the composite eagerly.
            torch._dynamo.reset()
        tensors = make_inputs(runnable[0], device, residual=any(c.op.startswith("add_") for c in runnable))
        upstream = [tensors[name] for name in ("dy", "dh") if name in tensors]
        steps = {(case, label): timed_step(fn, op_inputs(case.op, tensors), case.mode, upstream)
                 for case in runnable for label, fn in implementations(case.op, device, compile).items()}
        times = time_interleaved(steps, repeats, sync=sync)
        for case in runnable:
            case_times = {label: seconds for (c, label), seconds in times.items() if c == case}
            by_case[case] = case_results(case, case_times, peak_gbps)
            done += 1
            if progress is not None:
                progress(f"[{done}/{len(cases)}] {case_name(case.op, case.tensor)}: "
                         + ", ".join(f"{label} {format_seconds(s)}" for label, s in case_times.items()))
    return [result for case in cases for result in by_case.get(case, [])]


def case_results(case: Case, times: dict[str, float], peak_gbps: Optional[float]) -> list[Result]:
    """A case's results from its implementations' times: bandwidths and speed-ups over the baseline."""
    baseline = baseline_of(list(times))
    n_bytes = bytes_moved(case.op, case.rows, case.hidden, DTYPES[case.dtype].itemsize, case.mode)
    return [Result(**asdict(case), implementation=label, seconds=seconds, bytes_moved=n_bytes,
                   bandwidth_gbps=n_bytes / seconds / 1e9,
                   peak_fraction=n_bytes / seconds / 1e9 / peak_gbps if peak_gbps else None,
                   speedup=times[baseline] / seconds if baseline else None, baseline=baseline)
            for label, seconds in times.items()]


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """A time with a unit and three significant digits, e.g. ``12.3 µs``.

    The unit is chosen after rounding, so 999.7 µs prints as ``1 ms``, never as ``1e+03 µs``.
    """
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        value = float(f"{seconds / scale:.3g}")
        if value >= 1 or unit == "ns":
            return f"{value:.3g} {unit}"
    raise AssertionError("unreachable: the loop ends with ns")


TABLE_COLUMNS = ("op", "dtype", "hidden", "rows", "mode", "implementation", "time", "bandwidth", "of peak",
                 "speed-up")
TABLE_LEGEND = (f"speed-up: the baseline's time / this time (above 1.00x: faster). Baseline: {FUNCTIONAL}, "
                f"PyTorch's F.layer_norm / F.rms_norm called directly; for the add_* ops, which have no "
                f"functional op, {EAGER} (normlib's op with backend='torch').")


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    return [
        [r.op, r.dtype, str(r.hidden), str(r.rows), r.mode, r.implementation, format_seconds(r.seconds),
         f"{r.bandwidth_gbps:.3g} GB/s",
         f"{100 * r.peak_fraction:.0f}% of peak" if r.peak_fraction is not None else "-",
         f"{r.speedup:.2f}x" if r.speedup is not None else "-"]
        for r in results
    ]


def format_table(results: Sequence[Result], align: bool = True) -> str:
    """The results as a text table. ``align=False`` separates cells with " | " and no padding, so
    the text does not depend on how many digits a timing has (what the notebooks print)."""
    rows = [list(TABLE_COLUMNS)] + table_rows(results)
    if not align:
        return "\n".join(" | ".join(row) for row in rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    numeric = TABLE_COLUMNS.index("time")  # numbers from here on: right-aligned
    lines = ["  ".join(cell.rjust(w) if i >= numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _times(results: Sequence[Result], op: str, implementation: Optional[str] = None) -> dict[CaseKey, float]:
    return {r.tensor: r.seconds for r in results
            if r.op == op and (implementation is None or r.implementation == implementation)}


def case_name(op: str, key: CaseKey) -> str:
    """How progress lines and reports name a case: op, dtype, the tensor's rows x hidden, mode."""
    dtype, hidden, rows, mode = key
    return f"{op} {dtype} {rows}x{hidden} {mode}"


def time_relative_to_layer_norm(results: Sequence[Result]) -> list[str]:
    """One line per RMSNorm case: each implementation's time divided by F.layer_norm's time on a
    tensor of the same dtype, size and mode, and how many times faster normlib's CPU RMSNorm is
    than F.rms_norm; all measured in this run.

    The questions of the CPU-path issue: does dropping the mean make RMSNorm as cheap as the
    LayerNorm a reader would otherwise use (below 1.00x it is cheaper), and how much does the fused
    path gain over PyTorch's own RMSNorm?
    """
    f_layer_norm, f_rms_norm = _times(results, "layer_norm", FUNCTIONAL), _times(results, "rms_norm", FUNCTIONAL)
    normlib_cpu = _times(results, "rms_norm", NORMLIB_CPU)
    lines = []
    for key in _times(results, "rms_norm"):
        parts = []
        if key in f_layer_norm:
            parts.append(", ".join(f"{r.implementation} {r.seconds / f_layer_norm[key]:.2f}x" for r in results
                                   if r.op == "rms_norm" and r.tensor == key)
                         + " of F.layer_norm's time")
        if key in f_rms_norm and key in normlib_cpu:
            parts.append(f"{NORMLIB_CPU} {f_rms_norm[key] / normlib_cpu[key]:.2f}x faster than F.rms_norm")
        if parts:
            lines.append(f"{case_name('rms_norm', key)}: " + "; ".join(parts))
    return lines


def rms_norm_targets(results: Sequence[Result]) -> list[str]:
    """The CPU-path issue's targets for normlib's CPU RMSNorm, checked case by case: one line per
    case marked OK or MISS, then "targets met in N of M cases" and the misses.

    A case is checked when the run has all three times for its tensor: normlib cpu's rms_norm,
    F.layer_norm and F.rms_norm. The targets are the constants at the top of this module.
    """
    f_layer_norm, f_rms_norm = _times(results, "layer_norm", FUNCTIONAL), _times(results, "rms_norm", FUNCTIONAL)
    lines, misses = [], []
    for key, seconds in _times(results, "rms_norm", NORMLIB_CPU).items():
        if key not in f_layer_norm or key not in f_rms_norm:
            continue
        limit, minimum = RMS_NORM_MAX_TIME_VS_LAYER_NORM[key[3]], RMS_NORM_MIN_SPEEDUP_OVER_F_RMS_NORM
        ratio, faster = seconds / f_layer_norm[key], f_rms_norm[key] / seconds
        failed = ([f"{ratio:.2f}x F.layer_norm > {limit:g}x"] if ratio > limit else []) + (
            [f"only {faster:.2f}x faster than F.rms_norm < {minimum:g}x"] if faster < minimum else [])
        name = case_name("rms_norm", key)
        lines.append(f"{'MISS' if failed else 'OK  '} {name}: {ratio:.2f}x F.layer_norm's time (target <= {limit:g}x), "
                     f"{faster:.2f}x faster than F.rms_norm (target >= {minimum:g}x)")
        if failed:
            misses.append(f"  {name}: " + "; ".join(failed))
    if not lines:
        return [f"no case to check: the targets need layer_norm and rms_norm in the same run, with "
                f"{FUNCTIONAL} and {NORMLIB_CPU} timed"]
    lines.append(f"targets met in {len(lines) - len(misses)} of {len(lines)} cases")
    return lines + (["misses:"] + misses if misses else [])


def layer_norm_overhead(results: Sequence[Result]) -> list[str]:
    """One line per LayerNorm case: each normlib backend's time / F.layer_norm's, and the absolute
    difference, which at small sizes is normlib's dispatch overhead in microseconds."""
    f_layer_norm = _times(results, "layer_norm", FUNCTIONAL)
    by_case: dict[CaseKey, list[str]] = {}
    for r in results:
        if r.op == "layer_norm" and r.implementation in BACKEND_LABELS.values() and r.tensor in f_layer_norm:
            base = f_layer_norm[r.tensor]
            by_case.setdefault(r.tensor, []).append(
                f"{r.implementation} {r.seconds / base:.2f}x F.layer_norm's time ({(r.seconds - base) * 1e6:+.1f} µs)")
    return [f"{case_name('layer_norm', key)}: " + ", ".join(parts) for key, parts in by_case.items()]


def write_csv(results: Sequence[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Result.__dataclass_fields__))
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))


def write_json(results: Sequence[Result], path: Path, metadata: dict) -> None:
    with open(path, "w") as f:
        json.dump({"metadata": metadata, "results": [asdict(r) for r in results]}, f, indent=2)


def read_json(path: Path) -> tuple[dict, list[Result]]:
    """(metadata, results) of a file written by :func:`write_json`, e.g. a run on another machine.
    Files from before the functional baseline hold "speedup_vs_eager", relative to torch eager."""
    with open(path) as f:
        document = json.load(f)
    results = []
    for r in document["results"]:
        if "speedup_vs_eager" in r:
            r = {**r, "speedup": r.pop("speedup_vs_eager"), "baseline": EAGER}
        results.append(Result(**r))
    return document["metadata"], results


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# Defaults, and the presets that replace some of them; options given explicitly win over both.
DEFAULTS = dict(ops=list(OPS), dtypes=["bf16", "fp32"], hidden=[1024, 2048, 4096, 8192, 16384, 32768],
                modes=list(MODES))
QUICK = dict(ops=["layer_norm", "rms_norm"], dtypes=["fp32"], hidden=[256, 1024], rows=[64], repeats=5,
             compile=False)
# The sizes of the CPU-path issue (hidden 256..8192, rows 1..16384), adaptive repeats.
CPU_GRID = dict(device="cpu", ops=list(OPS), dtypes=["fp32", "bf16"], hidden=[256, 1024, 4096, 8192],
                rows=[1, 16, 256, 4096, 16384], modes=list(MODES), compile=False)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m normlib.bench",
        description="Time every available LayerNorm/RMSNorm implementation side by side, PyTorch's "
                    "functional ops first; print a table, the times relative to F.layer_norm and "
                    "(on the CPU) the CPU-path issue's targets; write CSV and JSON.",
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, help="ops to time (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="input dtypes (default: bf16 fp32)")
    parser.add_argument("--hidden", nargs="+", type=positive_int,
                        help="hidden sizes, the normalized width (default: 1024 2048 ... 32768)")
    parser.add_argument("--rows", nargs="+", type=positive_int,
                        help="rows (tokens) per tensor; every (hidden, rows) pair is a case "
                             "(default: 4096 on a GPU, 256 on the CPU)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="fwd: forward only (no autograd); fwd+bwd: forward and backward (default: both)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per measurement, the median is reported (default: 100 on a "
                             f"GPU; on the CPU adaptive, about {TARGET_MEASUREMENT_SECONDS:g} s of runs "
                             f"per measurement, {MIN_REPEATS} to {MAX_REPEATS})")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch (torch.set_num_threads); on a shared machine 1 "
                             "gives steadier timings, since a parallel region waits for its slowest "
                             "thread (default: PyTorch's own choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of the plain torch composite (default: on for "
                             "GPUs; off on the CPU, where the first compile takes tens of seconds)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                        help="skip, with a note, the cases whose tensors would take more than GIB "
                             f"GiB (default: {CPU_MEMORY_BUDGET_GIB:g} on the CPU, none on a GPU)")
    parser.add_argument("--output", type=Path, default=Path("bench_results"),
                        help="path prefix of the results: writes PREFIX.csv and PREFIX.json "
                             "(default: bench_results)")
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--quick", action="store_true",
                         help="a tiny configuration that runs in seconds on a CPU: layer_norm and "
                              "rms_norm, fp32, hidden 256 and 1024, 64 rows, 5 repeats, no "
                              "torch.compile (options given explicitly still apply)")
    presets.add_argument("--cpu-grid", action="store_true",
                         help="the CPU-path issue's grid on the CPU: all ops, fp32 and bf16, hidden 256 "
                              "1024 4096 8192, rows 1 16 256 4096 16384, fwd and fwd+bwd, adaptive "
                              "repeats, no torch.compile; prints the issue's targets case by case. The "
                              "16384-row cases take seconds a call and dominate the run time; options "
                              "given explicitly still apply, e.g. --hidden 256 1024 --rows 1 256")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else CPU_GRID if args.cpu_grid else {}
    for key, value in {**DEFAULTS, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    on_gpu = args.device.type == "cuda"
    args.rows = args.rows or [4096 if on_gpu else 256]
    args.repeats = args.repeats or (100 if on_gpu else None)  # None: adaptive
    args.compile = on_gpu if args.compile is None else args.compile
    if args.memory_budget is None and not on_gpu:
        args.memory_budget = CPU_MEMORY_BUDGET_GIB
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        peak, peak_source = peak_bandwidth_gbps(torch.cuda.get_device_name(device))
    else:
        print("measuring the CPU's copy bandwidth (the reference for 'of peak') ...", flush=True)
        peak = measure_copy_bandwidth(device)
        peak_source = "measured copy bandwidth (dst.copy_(src), 64 MiB, read + write)"
    print(f"device: {device_description(device)}; peak: "
          f"{f'{peak:.3g} GB/s' if peak else 'unknown'} ({peak_source})", flush=True)
    budget = int(args.memory_budget * 2**30) if args.memory_budget is not None else None
    results = run_benchmark(
        args.ops, args.dtypes, args.hidden, args.rows, args.modes, device=device, repeats=args.repeats,
        compile=args.compile, peak_gbps=peak, memory_budget_bytes=budget,
        progress=lambda line: print(line, flush=True),
    )
    print(f"\n{format_table(results)}\n{TABLE_LEGEND}")
    sections = [
        ("RMSNorm: each implementation's time / F.layer_norm's time on the same tensor, and F.rms_norm's "
         f"time / {NORMLIB_CPU}'s:", time_relative_to_layer_norm(results)),
        (f"LayerNorm: normlib's time / F.layer_norm's time, and the difference (normlib's dispatch overhead; "
         f"the CPU-path issue asks for <= {LAYER_NORM_MAX_TIME_VS_F_LAYER_NORM:g}x at large sizes, a few µs "
         f"at small ones):", layer_norm_overhead(results)),
    ]
    if device.type == "cpu" and "rms_norm" in args.ops:
        limits = RMS_NORM_MAX_TIME_VS_LAYER_NORM
        sections.append((
            f"Targets of the CPU-path issue for {NORMLIB_CPU}'s RMSNorm: forward <= {limits['fwd']:g}x "
            f"F.layer_norm's time, fwd+bwd <= {limits['fwd+bwd']:g}x, and >= "
            f"{RMS_NORM_MIN_SPEEDUP_OVER_F_RMS_NORM:g}x faster than F.rms_norm:", rms_norm_targets(results)))
    for title, lines in sections:
        if lines:
            print(f"\n{title}\n" + "\n".join(lines))
    metadata = {
        "device": device_description(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_bandwidth_gbps": peak,
        "peak_source": peak_source,
        "rows": args.rows,
        "repeats": args.repeats or (f"adaptive: about {TARGET_MEASUREMENT_SECONDS:g} s of runs per "
                                    f"measurement, {MIN_REPEATS} to {MAX_REPEATS}"),
        "memory_budget_gib": args.memory_budget,
        "cpu_threads": torch.get_num_threads(),
        "byte_model": " ".join(bytes_moved.__doc__.split()),
        "baseline": TABLE_LEGEND,
        "timing": (f"median wall-clock seconds of all runs, the implementations of a case timed in alternation "
                   f"in {ROUNDS} rounds (normlib.bench.time_interleaved), CUDA synchronized"),
    }
    try:
        import triton

        metadata["triton"] = triton.__version__
    except ImportError:
        metadata["triton"] = None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: a prefix such as "runs/h100.v2" keeps its dots.
    csv_path, json_path = Path(f"{args.output}.csv"), Path(f"{args.output}.json")
    write_csv(results, csv_path)
    write_json(results, json_path, metadata)
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
