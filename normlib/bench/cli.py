"""``python -m normlib.bench``: the command line of the benchmark (see :mod:`normlib.bench`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from normlib.bench.cases import COMPILED, DTYPES, LIGER, MODES, NORMLIB_CPU, OPS, bytes_moved
from normlib.bench.peers import liger_implementations, liger_unavailable_reason, use_wheel
from normlib.bench.report import TABLE_LEGEND, Result, against_peer, environment, format_table, \
    layer_norm_overhead, time_relative_to_layer_norm, write_csv, write_json
from normlib.bench.run import run_benchmark
from normlib.bench.timing import MAX_REPEATS, MIN_REPEATS, ROUNDS, TARGET_MEASUREMENT_SECONDS, \
    last_level_cache_bytes

CPU_MEMORY_BUDGET_GIB = 2.0  # default --memory-budget on the CPU (a GPU has no default budget)

# Defaults, and the presets that replace some of them; options given explicitly win over both.
DEFAULTS = dict(ops=list(OPS), dtypes=["bf16", "fp32"], hidden=[1024, 2048, 4096, 8192, 16384, 32768],
                modes=list(MODES))
QUICK = dict(ops=["layer_norm", "rms_norm"], dtypes=["fp32"], hidden=[256, 1024], rows=[64], repeats=5,
             compile=False)
# Hidden 256..8192 at 1..16384 rows, adaptive repeats, torch.compile beside normlib's C kernels.
CPU_GRID = dict(device="cpu", ops=list(OPS), dtypes=["fp32", "bf16"], hidden=[256, 1024, 4096, 8192],
                rows=[1, 16, 256, 4096, 16384], modes=list(MODES), compile=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m normlib.bench",
        description="Time every available LayerNorm/RMSNorm/DyT implementation side by side, PyTorch's "
                    "functional ops first; print a table, the times relative to F.layer_norm and to "
                    "torch.compile; write CSV and JSON.",
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
                        help="also time torch.compile of the plain torch composite, its compile time "
                             "reported apart (default: on for GPUs and the CPU grid; off otherwise on "
                             "the CPU, where a compile takes seconds per shape)")
    parser.add_argument("--liger", action=argparse.BooleanOptionalAction, default=True,
                        help="also time Liger-Kernel's norms where it can be imported (default: on)")
    parser.add_argument("--liger-wheel", type=Path, default=None, metavar="WHL",
                        help="a Liger-Kernel wheel to import from, unpacked to a temporary folder "
                             "(nothing is installed)")
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
                         help="the CPU grid: all ops, fp32 and bf16, hidden 256 1024 4096 8192, rows 1 16 "
                              "256 4096 16384, fwd and fwd+bwd, adaptive repeats, with torch.compile "
                              "(compiled once per shape). The 16384-row cases and the compiles dominate "
                              "the run time; options given explicitly still apply, e.g. --hidden 256 "
                              "1024 --rows 1 256")
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


def print_report(results: Sequence[Result]) -> None:
    """The table, then the comparisons within the run: RMSNorm against F.layer_norm, LayerNorm's
    dispatch overhead, and normlib's fused kernels against torch.compile and Liger-Kernel."""
    print(f"\n{format_table(results)}\n{TABLE_LEGEND}")
    sections = [
        ("RMSNorm: each implementation's time / F.layer_norm's time on the same tensor, and F.rms_norm's "
         f"time / {NORMLIB_CPU}'s:", time_relative_to_layer_norm(results)),
        ("LayerNorm: normlib's time / F.layer_norm's time, and the difference (normlib's dispatch overhead):",
         layer_norm_overhead(results)),
        (f"normlib's fused kernels against {COMPILED} of the composite (ahead: at most its time):",
         against_peer(results, COMPILED)),
        ("normlib's fused kernels against Liger-Kernel (ahead: at most its time):", against_peer(results, LIGER)),
    ]
    for title, lines in sections:
        if lines:
            print(f"\n{title}\n" + "\n".join(lines))


def metadata_of(args: argparse.Namespace, device: torch.device) -> dict:
    """What a results file records besides the results: environment, configuration, methods."""
    return {
        **environment(device),
        "rows": args.rows,
        "repeats": args.repeats or (f"adaptive: about {TARGET_MEASUREMENT_SECONDS:g} s of runs per "
                                    f"measurement, {MIN_REPEATS} to {MAX_REPEATS}"),
        "memory_budget_gib": args.memory_budget,
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "byte_model": " ".join(bytes_moved.__doc__.split()),
        "baseline": TABLE_LEGEND,
        "timing": (f"median wall-clock seconds of all runs, the implementations of a case and a copy of its "
                   f"bytes timed in alternation in {ROUNDS} rounds (normlib.bench.timing.time_interleaved), "
                   f"CUDA synchronized; torch.compile's first call timed apart (compile_seconds)"),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.liger_wheel is not None:
        use_wheel(args.liger_wheel)
    peers = None
    if args.liger:
        reason = liger_unavailable_reason()
        if reason is None:
            peers = liger_implementations
        elif device.type == "cuda" or args.liger_wheel is not None:
            print(f"Liger-Kernel: skipped, {reason}")
    print(f"device: {environment(device)['device']}; reference: a copy of each case's bytes, timed alongside",
          flush=True)
    budget = int(args.memory_budget * 2**30) if args.memory_budget is not None else None
    start = time.monotonic()
    results = run_benchmark(
        args.ops, args.dtypes, args.hidden, args.rows, args.modes, device=device, repeats=args.repeats,
        compile=args.compile, peers=peers, memory_budget_bytes=budget,
        progress=lambda line: print(line, flush=True),
    )
    print_report(results)
    metadata = {**metadata_of(args, device), "seconds": round(time.monotonic() - start, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: a prefix such as "runs/h100.v2" keeps its dots.
    csv_path, json_path = Path(f"{args.output}.csv"), Path(f"{args.output}.json")
    write_csv(results, csv_path)
    write_json(results, json_path, metadata)
    print(f"\nwrote {csv_path} and {json_path}")
    return 0
