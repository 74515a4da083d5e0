"""Running the cases: every implementation of all the ops on one tensor, timed in one group."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Callable, Optional, Sequence, Union

import torch

from normlib.bench.cases import COMPILED, DTYPES, Case, CaseKey, baseline_of, bytes_moved, case_memory_bytes, \
    case_name, implementations, make_inputs, op_inputs, op_unavailable_reason, timed_step
from normlib.bench.report import Result, format_seconds
from normlib.bench.timing import TARGET_MEASUREMENT_SECONDS, copy_bytes, copy_step, last_level_cache_bytes, \
    sync_for, time_interleaved

# On a GPU each sample runs a step for at least this long between two synchronizations, so that
# launching and synchronizing do not pass for a microsecond kernel's time.
GPU_SAMPLE_SECONDS = 1e-3
COPY = "copy"  # the key of a group's copy steps (not an implementation: it has no result row)


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
    compile_dtypes: Optional[Sequence[str]] = None,
    peers: Optional[Callable[[str], dict[str, Callable]]] = None,
    copy_reference: bool = True,
    memory_budget_bytes: Optional[int] = None,
    deadline: Optional[float] = None,
    target_seconds: float = TARGET_MEASUREMENT_SECONDS,
    shapes: Optional[Sequence[tuple[int, int]]] = None,
    interpreted_triton: bool = False,
    progress: Optional[Callable[[str], None]] = print,
) -> list[Result]:
    """Time every implementation on every (op, dtype, hidden size, row count, mode) case.

    The cases of all ops on one tensor (dtype, hidden, rows, mode) are timed together, in one
    ``time_interleaved`` group on shared tensors: the reports compare ops with each other
    (RMSNorm against F.layer_norm), and those ratios deserve the same fairness as the ones within
    an op. With ``copy_reference``, each group also times a copy of each case's bytes, the reference
    of the "of copy" fraction. Results come back in case order (op, dtype, hidden, rows, mode).

    ``shapes`` ((hidden, rows) pairs) replaces the product of ``hidden_sizes`` and ``rows``.
    ``interpreted_triton`` also runs the Triton backend on CPU tensors, under its interpreter
    (to check the plumbing; the times mean nothing). ``peers(op)`` gives other libraries' implementations of ``op`` (label -> function).
    ``compile`` adds ``torch.compile`` of the composite; its first call, which compiles, is timed
    apart and reported as ``compile_seconds``; ``compile_dtypes`` limits it to those dtypes (each
    shape compiles anew, seconds apiece). ``repeats=None`` picks each measurement's runs
    adaptively (about ``target_seconds`` each). Cases whose tensors would take more than
    ``memory_budget_bytes`` (``case_memory_bytes``), cases of an op this normlib lacks, and, once
    ``time.monotonic()`` passes ``deadline``, all remaining cases are skipped with a note, printed
    even when ``progress`` is None. ``progress`` gets one line per case with its times.
    """
    row_counts = [rows] if isinstance(rows, int) else list(rows)
    pairs = list(shapes) if shapes is not None else [(h, n) for h in hidden_sizes for n in row_counts]
    cases = [Case(op, dtype, hidden, n, mode) for op in ops for dtype in dtypes for hidden, n in pairs
             for mode in modes]
    groups: dict[CaseKey, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.tensor, []).append(case)
    sync = sync_for(device)
    cache_bytes = last_level_cache_bytes(device)
    by_case: dict[Case, list[Result]] = {}
    done = 0
    note = progress or print
    missing_ops = {op: reason for op in ops if (reason := op_unavailable_reason(op)) is not None}
    for op, reason in missing_ops.items():
        note(f"{op}: skipped, {reason}")
    for group in groups.values():
        runnable = []
        for case in group:
            needed, budget = case_memory_bytes(case) / 2**30, (memory_budget_bytes or math.inf) / 2**30
            if case.op in missing_ops:
                done += 1
            elif deadline is not None and time.monotonic() > deadline:
                done += 1
                note(f"[{done}/{len(cases)}] {case_name(case.op, case.tensor)}: skipped, out of time")
            elif needed > budget:
                done += 1
                note(f"[{done}/{len(cases)}] {case_name(case.op, case.tensor)}: skipped, its tensors "
                     f"would take {needed:.2f} GiB, over the memory budget of {budget:.2f} GiB")
            else:
                runnable.append(case)
        if not runnable:
            continue
        compiling = compile and (compile_dtypes is None or runnable[0].dtype in compile_dtypes)
        if compiling:
            # A fresh cache for every group: dynamo recompiles a function for each new shape and
            # dtype, and past its recompile limit (8) it would silently run the composite eagerly.
            torch._dynamo.reset()
        tensors = make_inputs(runnable[0], device, residual=any(c.op.startswith("add_") for c in runnable))
        upstream = [tensors[name] for name in ("dy", "dh") if name in tensors]
        steps, first_calls, failures = {}, {}, {}
        for case in runnable:
            for label, fn in implementations(case.op, device, compiling, peers(case.op) if peers else None,
                                             interpreted_triton).items():
                start = time.perf_counter()
                try:
                    step = timed_step(fn, op_inputs(case.op, tensors), case.mode, upstream)
                    step()
                    sync()
                except Exception as error:  # a peer or compiler that cannot run here: say so, go on
                    failures[(case, label)] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    continue
                first_calls[(case, label)] = time.perf_counter() - start
                steps[(case, label)] = step
            if copy_reference:
                n_bytes = bytes_moved(case.op, case.rows, case.hidden, DTYPES[case.dtype].itemsize, case.mode)
                steps.setdefault((COPY, n_bytes), copy_step(n_bytes, device))
        times = time_interleaved(steps, repeats, sync=sync, target_seconds=target_seconds,
                                 min_sample_seconds=GPU_SAMPLE_SECONDS if device.type == "cuda" else 0.0)
        for case in runnable:
            case_times = {label: seconds for (c, label), seconds in times.items() if c == case}
            n_bytes = bytes_moved(case.op, case.rows, case.hidden, DTYPES[case.dtype].itemsize, case.mode)
            copy_gbps = copy_bytes(n_bytes) / times[(COPY, n_bytes)] / 1e9 if copy_reference else None
            compile_seconds = {label: max(0.0, first_calls[(case, label)] - seconds)
                               for label, seconds in case_times.items() if label == COMPILED}
            by_case[case] = case_results(case, case_times, copy_gbps, compile_seconds,
                                         cache_resident=cache_bytes is not None and n_bytes <= cache_bytes)
            done += 1
            if progress is not None:
                progress(f"[{done}/{len(cases)}] {case_name(case.op, case.tensor)}: "
                         + ", ".join(f"{label} {format_seconds(s)}" for label, s in case_times.items())
                         + "".join(f"; {label} failed ({why})" for (c, label), why in failures.items() if c == case))
            elif any(c == case for c, _ in failures):
                note("; ".join(f"{case_name(case.op, case.tensor)}: {label} failed ({why})"
                               for (c, label), why in failures.items() if c == case))
    return [result for case in cases for result in by_case.get(case, [])]


def case_results(case: Case, times: dict[str, float], copy_gbps: Optional[float],
                 compile_seconds: Optional[dict[str, float]] = None, cache_resident: bool = False) -> list[Result]:
    """A case's results from its implementations' times: bandwidths, fractions of the copy's
    bandwidth (capped at 1, see :mod:`normlib.bench.report`) and speed-ups over the baseline."""
    baseline = baseline_of(list(times))
    n_bytes = bytes_moved(case.op, case.rows, case.hidden, DTYPES[case.dtype].itemsize, case.mode)
    results = []
    for label, seconds in times.items():
        bandwidth = n_bytes / seconds / 1e9
        fraction = bandwidth / copy_gbps if copy_gbps else None
        results.append(Result(
            **asdict(case), implementation=label, seconds=seconds, bytes_moved=n_bytes, bandwidth_gbps=bandwidth,
            peak_fraction=min(fraction, 1.0) if fraction is not None else None,
            speedup=times[baseline] / seconds if baseline else None, baseline=baseline, copy_gbps=copy_gbps,
            above_copy=fraction is not None and fraction > 1.0, cache_resident=cache_resident,
            compile_seconds=(compile_seconds or {}).get(label)))
    return results
