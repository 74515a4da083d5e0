"""What the benchmark reports: results, the table, the comparisons within one run, and the files.

Every number here is a ratio measured in the same run, or a bandwidth divided by the bandwidth of
a copy of the same number of bytes measured alongside it. That fraction cannot pass 100% honestly:
an op that moves its bytes faster than a copy of them means the copy was slowed by something the
op escaped (noise, a page fault), so the fraction is capped at 100% and the result marked
``above_copy``. Cases whose bytes fit in the device's largest cache are marked ``cache_resident``:
their bandwidth is the cache's, not the memory's.
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch

from normlib.bench.cases import COMPILED, EAGER, FUNCTIONAL, NORMLIB_CPU, TRITON, BACKEND_LABELS, Case, CaseKey, \
    case_name


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
    peak_fraction: Optional[float]  # bandwidth / the reference bandwidth, at most 1; None without one
    speedup: Optional[float]  # the baseline's time / this time; None without a baseline
    baseline: Optional[str] = None  # the implementation speedup is relative to (see cases.baseline_of)
    copy_gbps: Optional[float] = None  # a copy of the same bytes, measured alongside (the reference)
    above_copy: bool = False  # faster than the copy: peak_fraction was capped at 1
    cache_resident: bool = False  # the case's bytes fit in the device's largest cache
    compile_seconds: Optional[float] = None  # torch.compile: the first call's time over a warm call's

    tensor = Case.tensor


def format_seconds(seconds: float) -> str:
    """A time with a unit and three significant digits, e.g. ``12.3 µs``.

    The unit is chosen after rounding, so 999.7 µs prints as ``1 ms``, never as ``1e+03 µs``.
    """
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        value = float(f"{seconds / scale:.3g}")
        if value >= 1 or unit == "ns":
            return f"{value:.3g} {unit}"
    raise AssertionError("unreachable: the loop ends with ns")


def format_fraction(result: Result) -> str:
    """"42% of copy", with "(cache)" when the case fits in the largest cache, "-" without a copy."""
    if result.peak_fraction is None:
        return "-"
    text = f"{100 * min(result.peak_fraction, 1.0):.0f}% of copy"
    return text + (" (cache)" if result.cache_resident else "")


TABLE_COLUMNS = ("op", "dtype", "hidden", "rows", "mode", "implementation", "time", "bandwidth", "of copy",
                 "speed-up")
TABLE_LEGEND = (f"speed-up: the baseline's time / this time (above 1.00x: faster). Baseline: {FUNCTIONAL}, "
                f"PyTorch's F.layer_norm / F.rms_norm called directly; for the add_* ops and DyT, which have "
                f"no functional op, {EAGER} (normlib's op with backend='torch'). of copy: the effective "
                f"bandwidth over that of a copy of the same bytes timed alongside, at most 100%; (cache): the "
                f"bytes fit in the device's largest cache.")


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    return [
        [r.op, r.dtype, str(r.hidden), str(r.rows), r.mode, r.implementation, format_seconds(r.seconds),
         f"{r.bandwidth_gbps:.3g} GB/s", format_fraction(r),
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


def time_relative_to_layer_norm(results: Sequence[Result]) -> list[str]:
    """One line per RMSNorm case: each implementation's time divided by F.layer_norm's time on a
    tensor of the same dtype, size and mode, and how many times faster normlib's CPU RMSNorm is
    than F.rms_norm; all measured in this run. Below 1.00x, RMSNorm is the cheaper of the two."""
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


def fastest_normlib(results: Sequence[Result], op: str, key: CaseKey) -> Optional[Result]:
    """normlib's fastest fused backend ("normlib cpu" or "triton") on one case, or None."""
    candidates = [r for r in results if r.op == op and r.tensor == key and r.implementation in (NORMLIB_CPU, TRITON)]
    return min(candidates, key=lambda r: r.seconds, default=None)


def against_peer(results: Sequence[Result], peer: str = COMPILED) -> list[str]:
    """One line per case that has both a fused normlib backend and ``peer``: normlib's time over
    the peer's, marked "ahead" (at most the peer's time) or "behind", then the count of cases
    ahead and, for torch.compile, the compile times reported apart from the run times."""
    lines, ahead, total, compile_times = [], 0, 0, []
    for r in results:
        if r.implementation != peer:
            continue
        if r.compile_seconds is not None:
            compile_times.append(r.compile_seconds)
        ours = fastest_normlib(results, r.op, r.tensor)
        if ours is None:
            continue
        ratio = ours.seconds / r.seconds
        total += 1
        ahead += ratio <= 1.0
        lines.append(f"{'ahead ' if ratio <= 1.0 else 'behind'} {case_name(r.op, r.tensor)}: {ours.implementation} "
                     f"{ratio:.2f}x {peer}'s time ({format_seconds(ours.seconds)} vs {format_seconds(r.seconds)})")
    if not lines:
        return []
    lines.append(f"normlib at most {peer}'s time in {ahead} of {total} cases")
    if compile_times:
        lines.append(f"{peer} compile time, apart from the run times above: {format_seconds(sum(compile_times))} "
                     f"in all, {format_seconds(max(compile_times))} at most for one case")
    return lines


def write_csv(results: Sequence[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Result)])
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))


def write_json(results: Sequence[Result], path: Path, metadata: dict) -> None:
    with open(path, "w") as f:
        json.dump({"metadata": metadata, "results": [asdict(r) for r in results]}, f, indent=2)


def read_json(path: Path) -> tuple[dict, list[Result]]:
    """(metadata, results) of a file written by :func:`write_json`, e.g. a run on another machine.
    Older files hold "speedup_vs_eager", relative to torch eager, and lack the newer fields."""
    with open(path) as f:
        document = json.load(f)
    known = {field.name for field in fields(Result)}
    results = []
    for r in document["results"]:
        if "speedup_vs_eager" in r:
            r = {**r, "speedup": r.pop("speedup_vs_eager"), "baseline": EAGER}
        results.append(Result(**{k: v for k, v in r.items() if k in known}))
    return document["metadata"], results


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def environment(device: torch.device) -> dict:
    """The device, driver and software versions a results file records."""
    metadata = {
        "device": device_description(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": None,
        "triton": None,
        "liger_kernel": None,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        metadata["compute_capability"] = f"{properties.major}.{properties.minor}"
        metadata["driver"] = cuda_driver_version()
    try:
        import triton

        metadata["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        metadata["liger_kernel"] = version("liger-kernel")
    except Exception:  # not installed, or brought as a wheel without its metadata
        pass
    return metadata


def cuda_driver_version() -> Optional[str]:
    """The NVIDIA driver's version, from NVML through torch or from the kernel module; None if neither."""
    try:
        import pynvml  # shipped with torch's CUDA builds as nvidia-ml-py

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        return text.split("Kernel Module", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
