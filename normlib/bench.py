"""The benchmark: every available implementation of LayerNorm and RMSNorm, side by side.

    python -m normlib.bench                      # all ops, bf16 and fp32, hidden 1K..32K
    python -m normlib.bench --quick              # a tiny configuration (seconds, on a CPU)
    python -m normlib.bench --ops rms_norm --dtypes bf16 --hidden 4096 8192 --modes fwd
    python -m normlib.bench --help

For each case (op, dtype, hidden size, mode) it times, on one device:

* every backend in ``normlib.available_backends(op, device)`` (``"torch"`` is shown as
  "torch eager"; ``"cpu"`` and ``"triton"`` appear when they can run there; Triton's CPU
  interpreter is a correctness tool and is never timed);
* "composite": the op written as plain torch operations, run eagerly (one kernel per operation);
* "torch.compile": that composite compiled by ``torch.compile`` (on by default on a GPU, off on
  the CPU where the first compile takes tens of seconds; ``--compile`` / ``--no-compile``).

It prints a table (median time, effective bandwidth, fraction of the device's peak bandwidth,
speed-up over torch eager) and writes it as CSV and JSON. Timings are medians of ``--repeats``
runs; no speed is asserted anywhere.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import normlib
from normlib.book.timing import median_time

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
LAYER_NORM_EPS = 1e-5

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


@dataclass(frozen=True)
class Case:
    op: str
    dtype: str
    hidden: int
    rows: int
    mode: str


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
    speedup_vs_eager: Optional[float]  # torch eager time / this time; None without a torch row


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


BACKEND_LABELS = {"torch": "torch eager", "cpu": "normlib cpu", "triton": "triton"}


def implementations(op: str, device: torch.device, compile: bool) -> dict[str, Callable]:
    """label -> function for everything that can run ``op`` on ``device``; torch eager first."""
    found = {}
    for backend in normlib.available_backends(op, device):
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter: for tests, orders of magnitude slower than anything here
        found[BACKEND_LABELS.get(backend, backend)] = normlib_call(op, backend)
    found["composite"] = COMPOSITES[op]
    if compile:
        # A fresh cache for every case: dynamo recompiles a function for each new shape and dtype,
        # and past its recompile limit (8) it would silently run the composite eagerly instead.
        torch._dynamo.reset()
        found["torch.compile"] = torch.compile(COMPOSITES[op], dynamic=False)
    order = ["torch eager"] + [label for label in found if label != "torch eager"]
    return {label: found[label] for label in order if label in found}


def make_inputs(case: Case, device: torch.device, requires_grad: bool) -> list[torch.Tensor]:
    """The op's tensors for ``case``: x (and residual), weight (and bias), seeded."""
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[case.dtype]

    def tensor(shape, scale=1.0, offset=0.0):
        t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale + offset
        return t.to(dtype).requires_grad_(requires_grad)

    tensors = [tensor((case.rows, case.hidden))]
    if case.op.startswith("add_"):
        tensors.append(tensor((case.rows, case.hidden)))
    tensors.append(tensor((case.hidden,), 0.1, 1.0))  # weight near 1, as after initialization
    if case.op.endswith("layer_norm"):
        tensors.append(tensor((case.hidden,), 0.1))
    return tensors


def timed_step(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """A closure running one forward (and backward) of ``fn`` on ``inputs``."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [torch.randn_like(o) for o in outputs]

    def forward_backward():
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        # autograd.grad, not backward(): nothing accumulates into .grad between repeats.
        return torch.autograd.grad(out, inputs, upstream)

    return forward_backward


# ------------------------------------------------------------------------------------------------
# Running and reporting
# ------------------------------------------------------------------------------------------------


def run_benchmark(
    ops: Sequence[str],
    dtypes: Sequence[str],
    hidden_sizes: Sequence[int],
    rows: int,
    modes: Sequence[str],
    *,
    device: torch.device,
    repeats: int = 20,
    compile: bool = False,
    peak_gbps: Optional[float] = None,
    progress: Optional[Callable[[str], None]] = print,
) -> list[Result]:
    """Time every implementation on every case; ``progress`` gets one line per measurement."""
    cases = [Case(op, dt, hidden, rows, mode) for op in ops for dt in dtypes for hidden in hidden_sizes for mode in modes]
    results: list[Result] = []
    for index, case in enumerate(cases, start=1):
        element_size = torch.tensor([], dtype=DTYPES[case.dtype]).element_size()
        n_bytes = bytes_moved(case.op, case.rows, case.hidden, element_size, case.mode)
        inputs = make_inputs(case, device, requires_grad=case.mode != "fwd")
        case_results = []
        for label, fn in implementations(case.op, device, compile).items():
            seconds = median_time(timed_step(fn, inputs, case.mode), repeat=repeats, warmup=3)
            gbps = n_bytes / seconds / 1e9
            case_results.append(
                Result(**asdict(case), implementation=label, seconds=seconds, bytes_moved=n_bytes,
                       bandwidth_gbps=gbps, peak_fraction=gbps / peak_gbps if peak_gbps else None,
                       speedup_vs_eager=None)
            )
            if progress is not None:
                progress(f"[{index}/{len(cases)}] {case.op} {case.dtype} hidden={case.hidden} {case.mode}: "
                         f"{label} {format_seconds(seconds)}")
        eager = next((r.seconds for r in case_results if r.implementation == "torch eager"), None)
        for result in case_results:
            result.speedup_vs_eager = eager / result.seconds if eager else None
        results.extend(case_results)
    return results


def format_seconds(seconds: float) -> str:
    """A time with a unit and three significant digits, e.g. ``12.3 µs``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


TABLE_COLUMNS = ("op", "dtype", "hidden", "mode", "implementation", "time", "bandwidth", "of peak", "vs eager")


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    return [
        [r.op, r.dtype, str(r.hidden), r.mode, r.implementation, format_seconds(r.seconds),
         f"{r.bandwidth_gbps:.3g} GB/s",
         f"{100 * r.peak_fraction:.0f}% of peak" if r.peak_fraction is not None else "-",
         f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager is not None else "-"]
        for r in results
    ]


def format_table(results: Sequence[Result], align: bool = True) -> str:
    """The results as a text table. ``align=False`` separates cells with " | " and no padding, so
    the text does not depend on how many digits a timing has (what the notebooks print)."""
    rows = [list(TABLE_COLUMNS)] + table_rows(results)
    if not align:
        return "\n".join(" | ".join(row) for row in rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i >= 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def time_relative_to_layer_norm(results: Sequence[Result]) -> list[str]:
    """One line per RMSNorm case: each implementation's time divided by PyTorch's LayerNorm time
    on a tensor of the same size, dtype and mode, both measured in this run.

    The question a reader of the RMSNorm chapter asks: does dropping the mean make the op cheaper
    than the LayerNorm they would otherwise use? Below 1.00x RMSNorm is faster.
    """
    layer_norm_eager = {
        (r.dtype, r.hidden, r.rows, r.mode): r.seconds
        for r in results
        if r.op == "layer_norm" and r.implementation == "torch eager"
    }
    lines = []
    for key in dict.fromkeys((r.dtype, r.hidden, r.rows, r.mode) for r in results if r.op == "rms_norm"):
        baseline = layer_norm_eager.get(key)
        if baseline is None:
            continue
        ratios = [
            f"{r.implementation} {r.seconds / baseline:.2f}x"
            for r in results
            if r.op == "rms_norm" and (r.dtype, r.hidden, r.rows, r.mode) == key
        ]
        dtype, hidden, rows, mode = key
        lines.append(f"rms_norm {dtype} {rows}x{hidden} {mode}: " + ", ".join(ratios))
    return lines


def write_csv(results: Sequence[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else list(Result.__annotations__))
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))


def write_json(results: Sequence[Result], path: Path, metadata: dict) -> None:
    with open(path, "w") as f:
        json.dump({"metadata": metadata, "results": [asdict(r) for r in results]}, f, indent=2)


def read_json(path: Path) -> tuple[dict, list[Result]]:
    """(metadata, results) of a file written by :func:`write_json`, e.g. a run on another machine."""
    with open(path) as f:
        document = json.load(f)
    return document["metadata"], [Result(**r) for r in document["results"]]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# Defaults of the options that --quick changes; options given explicitly win over both.
DEFAULTS = dict(ops=list(OPS), dtypes=["bf16", "fp32"], hidden=[1024, 2048, 4096, 8192, 16384, 32768])
QUICK = dict(ops=["layer_norm", "rms_norm"], dtypes=["fp32"], hidden=[256, 1024], rows=64, repeats=5,
             compile=False)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m normlib.bench",
        description="Time every available LayerNorm/RMSNorm implementation side by side; print a "
                    "table and write CSV and JSON.",
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, help="ops to time (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="input dtypes (default: bf16 fp32)")
    parser.add_argument("--hidden", nargs="+", type=positive_int,
                        help="hidden sizes, the normalized width (default: 1024 2048 ... 32768)")
    parser.add_argument("--rows", type=positive_int, default=None,
                        help="rows (tokens) per tensor, fixed across hidden sizes "
                             "(default: 4096 on a GPU, 256 on the CPU)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="fwd: forward only (no autograd); fwd+bwd: forward and backward")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed runs per measurement, the median is reported (default: 100 on a GPU, 10 on the CPU)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for PyTorch (torch.set_num_threads); on a shared machine 1 "
                             "gives steadier timings, since a parallel region waits for its slowest "
                             "thread (default: PyTorch's own choice)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of the plain torch composite (default: on for "
                             "GPUs; off on the CPU, where the first compile takes tens of seconds)")
    parser.add_argument("--output", type=Path, default=Path("bench_results"),
                        help="path prefix of the results: writes PREFIX.csv and PREFIX.json "
                             "(default: bench_results)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration that runs in seconds on a CPU: layer_norm and "
                             "rms_norm, fp32, hidden 256 and 1024, 64 rows, 5 repeats, no "
                             "torch.compile (options given explicitly still apply)")
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device}")
    on_gpu = args.device.type == "cuda"
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = args.rows or (4096 if on_gpu else 256)
    args.repeats = args.repeats or (100 if on_gpu else 10)
    args.compile = on_gpu if args.compile is None else args.compile
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
    results = run_benchmark(
        args.ops, args.dtypes, args.hidden, args.rows, args.modes, device=device, repeats=args.repeats,
        compile=args.compile, peak_gbps=peak, progress=lambda line: print(line, flush=True),
    )
    print()
    print(format_table(results))
    relative = time_relative_to_layer_norm(results)
    if relative:
        print("\nRMSNorm's time divided by PyTorch's LayerNorm time (torch eager) on the same tensor:")
        print("\n".join(relative))
    metadata = {
        "device": device_description(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_bandwidth_gbps": peak,
        "peak_source": peak_source,
        "rows": args.rows,
        "repeats": args.repeats,
        "cpu_threads": torch.get_num_threads(),
        "byte_model": " ".join(bytes_moved.__doc__.split()),
        "timing": "median wall-clock seconds (normlib.book.timing.median_time), CUDA synchronized",
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
