"""The GPU check in one command: ``make gpu-check``, or ``python -m normlib.bench.gpu_check``.

On a machine with an NVIDIA GPU it

1. runs the conformance tests (``tests/test_conformance.py``) with the Triton kernels compiled
   for the GPU, in a subprocess (so the interpreter stays off);
2. times normlib's Triton kernels against PyTorch's own ops, normlib's eager path, the eager
   composite, ``torch.compile`` of it and Liger-Kernel (where it can be imported): LayerNorm and
   RMSNorm, with and without the residual add, forward and forward+backward, bf16, fp16 and fp32,
   1K to 32K features at 4096 to 16384 rows;
3. prints the table (time, GB/s, fraction of a copy of the same bytes) and the goal, case by case:
   forward+backward in bf16 at 4K features and more, at ``GOAL_COPY_FRACTION`` of the copy's
   bandwidth or more and at most the time of ``torch.compile`` and of Liger-Kernel;
4. writes ``results/gpu/<device>-<date>.json``: the results, the device, driver, Python, torch,
   Triton and Liger versions, and the conformance tests' outcome.

It uses the Python, PyTorch and Triton it finds and installs nothing: normlib comes from the
working tree it runs in, Liger-Kernel from an installed package or a wheel passed with
``--liger-wheel``. Cases start only while the time budget (``--budget``, default 7.5 minutes for
the whole check) lasts; the rest are skipped with a note, bf16 (the goal's dtype) first.

``--dry-run`` runs the same steps on the CPU with tiny sizes, the Triton kernels under the
interpreter and no timing worth reading: it checks that the command works where no GPU is (``make
test`` runs it), and writes its file with ``"dry_run": true``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from normlib.bench.cases import COMPILED, LIGER, TRITON, case_name
from normlib.bench.cases import OPS as ALL_OPS
from normlib.bench.peers import liger_implementations, liger_unavailable_reason, use_wheel
from normlib.bench.report import TABLE_LEGEND, Result, against_peer, environment, format_table, write_json
from normlib.bench.run import run_benchmark
from normlib.bench.timing import last_level_cache_bytes

REPOSITORY = Path(__file__).resolve().parents[2]
CONFORMANCE_TESTS = "tests/test_conformance.py"

OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
DTYPES = ["bf16", "fp16", "fp32"]  # bf16 first: the goal's dtype is measured before time runs out
MODES = ["fwd", "fwd+bwd"]
# (features, rows): 1K to 32K features, rows from 16384 down to 4096 so that no tensor passes
# 128M elements (256 MiB in bf16) and every case is far beyond the GPU's L2 cache.
SHAPES = [(1024, 16384), (2048, 16384), (4096, 16384), (8192, 8192), (16384, 4096), (32768, 4096)]
COMPILE_DTYPES = ["bf16"]  # torch.compile compiles every shape anew, seconds apiece: the goal's dtype
TARGET_SECONDS = 0.05  # about this long of timed runs per measurement (adaptive repeats)
BUDGET_SECONDS = 450.0  # the whole check, tests included, stays under 8 minutes
TESTS_SHARE = 0.4  # at most this share of the budget for the conformance tests
WRITE_RESERVE_SECONDS = 30.0  # no new case starts this close to the end of the budget

DRY_SHAPES = [(64, 4), (4096, 2)]  # the second reaches the goal's 4K features
DRY_OPS = ["layer_norm", "add_rms_norm"]
# In the dry run only the test of the device selection runs (make test runs the rest itself).
DRY_TEST_SELECTION = "device_selection"

# The goal the book states next to the results (chapter 7).
GOAL_COPY_FRACTION = 0.85
GOAL_MIN_HIDDEN = 4096
GOAL_DTYPE = "bf16"
GOAL_MODE = "fwd+bwd"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m normlib.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, tiny sizes, Triton's interpreter: check that the command works")
    parser.add_argument("--output-dir", type=Path, default=REPOSITORY / "results" / "gpu",
                        help="where the results file goes (default: results/gpu in the working tree)")
    parser.add_argument("--liger-wheel", type=Path, default=None, metavar="WHL",
                        help="a Liger-Kernel wheel to import from (unpacked to a temporary folder)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, metavar="SECONDS",
                        help=f"time for the whole check; cases past it are skipped (default {BUDGET_SECONDS:g})")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--ops", nargs="+", default=None, choices=ALL_OPS,
                        help=f"ops to time (default: {' '.join(OPS)})")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES,
                        help=f"dtypes (default: {' '.join(DTYPES)})")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: the GPU check needs an NVIDIA GPU (use --dry-run to try the "
                     "command on the CPU)")
    return args


def run_conformance_tests(dry_run: bool, timeout: float) -> dict:
    """Run the conformance tests in a subprocess; returns {"command", "returncode", "summary"}.

    The subprocess sees this working tree first on its path, and the interpreter is switched on only
    in the dry run (the tests' conftest switches it on by itself where there is no GPU)."""
    if importlib.util.find_spec("pytest") is None:
        return {"command": None, "returncode": None,
                "summary": "skipped: pytest is not installed with this Python (python -m pip install pytest)"}
    command = [sys.executable, "-m", "pytest", CONFORMANCE_TESTS, "-q", "-p", "no:cacheprovider"]
    if dry_run:
        command += ["-k", DRY_TEST_SELECTION]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
    if not dry_run:
        env.pop("TRITON_INTERPRET", None)
    print(f"$ {' '.join(command)}", flush=True)
    try:
        done = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command), "returncode": None, "summary": f"stopped after {timeout:.0f} s"}
    output = done.stdout + done.stderr
    print(output[-4000:], flush=True)
    last = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error|skipped|deselected)\b", line)]
    return {"command": " ".join(command), "returncode": done.returncode, "summary": last[-1].strip("= ") if last else ""}


def goal_lines(results: Sequence[Result]) -> list[str]:
    """The goal, case by case: the Triton kernels' forward+backward in bf16 at 4K features and more
    at ``GOAL_COPY_FRACTION`` of the copy's bandwidth or more, and at most the time of
    torch.compile and of Liger-Kernel where they were timed. One line per case, then the count."""
    lines, met, total = [], 0, 0
    for r in results:
        if not (r.implementation == TRITON and r.dtype == GOAL_DTYPE and r.mode == GOAL_MODE
                and r.hidden >= GOAL_MIN_HIDDEN):
            continue
        misses = []
        if r.peak_fraction is None or r.peak_fraction < GOAL_COPY_FRACTION:
            fraction = "unknown" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%"
            misses.append(f"{fraction} of copy, below {100 * GOAL_COPY_FRACTION:.0f}%")
        for peer in (COMPILED, LIGER):
            other = next((o for o in results if o.implementation == peer and o.op == r.op and o.tensor == r.tensor), None)
            if other is not None and r.seconds > other.seconds:
                misses.append(f"{r.seconds / other.seconds:.2f}x {peer}'s time")
        total += 1
        met += not misses
        details = misses or [f"{100 * r.peak_fraction:.0f}% of copy"]
        lines.append(f"{'MISS' if misses else 'MET '} {case_name(r.op, r.tensor)}: {'; '.join(details)}")
    if not total:
        return [f"no case for the goal: it needs triton timed on {GOAL_DTYPE} {GOAL_MODE} at "
                f"{GOAL_MIN_HIDDEN}+ features"]
    return lines + [f"goal met in {met} of {total} cases"]


def results_path(output_dir: Path, device: str, dry_run: bool, now: datetime.datetime) -> Path:
    """``<output_dir>/<device>-<date>.json``, the device name in lower case with dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    prefix = "dry-run-" if dry_run else ""
    return Path(output_dir) / f"{prefix}{slug}-{now.strftime('%Y-%m-%d')}.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget - WRITE_RESERVE_SECONDS
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run and not torch.cuda.is_available():
        # Before anything imports triton: @triton.jit reads it when a kernel is defined. (Where CUDA
        # exists the kernels are compiled for it, and the dry run times the other implementations.)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.liger_wheel is not None:
        use_wheel(args.liger_wheel)
    metadata = {**environment(device), "dry_run": args.dry_run,
                "last_level_cache_bytes": last_level_cache_bytes(device)}
    print(f"GPU check on {metadata['device']}: torch {metadata['torch']}, triton {metadata['triton']}, "
          f"CUDA {metadata['cuda']}, driver {metadata['driver']}, Python {metadata['python']}", flush=True)

    if args.skip_tests:
        metadata["conformance_tests"] = {"command": None, "returncode": None, "summary": "skipped: --skip-tests"}
    else:
        metadata["conformance_tests"] = run_conformance_tests(args.dry_run, timeout=TESTS_SHARE * args.budget)
    print(f"conformance tests: {metadata['conformance_tests']['summary']}", flush=True)

    liger_reason = liger_unavailable_reason()
    if liger_reason is not None:
        print(f"Liger-Kernel: skipped, {liger_reason}", flush=True)
    metadata["liger_skipped"] = liger_reason
    results = run_benchmark(
        args.ops or (DRY_OPS if args.dry_run else OPS), args.dtypes or ([GOAL_DTYPE] if args.dry_run else DTYPES),
        hidden_sizes=[], rows=[], modes=MODES, shapes=DRY_SHAPES if args.dry_run else SHAPES,
        device=device, repeats=1 if args.dry_run else None, target_seconds=TARGET_SECONDS,
        compile=not args.dry_run, compile_dtypes=COMPILE_DTYPES,
        peers=None if liger_reason else liger_implementations, deadline=deadline, interpreted_triton=args.dry_run,
        progress=lambda line: print(line, flush=True),
    )
    print(f"\n{format_table(results)}\n{TABLE_LEGEND}")
    goal = goal_lines(results) + (["(a dry run: the interpreter's times say nothing about speed)"]
                                  if args.dry_run else [])
    sections = [
        (f"The goal: {GOAL_MODE} in {GOAL_DTYPE} at {GOAL_MIN_HIDDEN}+ features at "
         f"{100 * GOAL_COPY_FRACTION:.0f}% of the copy's bandwidth or more, at most the time of "
         f"{COMPILED} and Liger-Kernel:", goal),
        (f"normlib against {COMPILED}:", against_peer(results, COMPILED)),
        ("normlib against Liger-Kernel:", against_peer(results, LIGER)),
    ]
    for title, lines in sections:
        if lines:
            print(f"\n{title}\n" + "\n".join(lines))
    now = datetime.datetime.now(datetime.timezone.utc)
    metadata.update({
        "shapes": [list(s) for s in (DRY_SHAPES if args.dry_run else SHAPES)],
        "goal": {"copy_fraction": GOAL_COPY_FRACTION, "min_hidden": GOAL_MIN_HIDDEN, "dtype": GOAL_DTYPE,
                 "mode": GOAL_MODE, "lines": goal},
        "seconds": round(time.monotonic() - start, 1),
        "budget_seconds": args.budget,
    })
    path = results_path(args.output_dir, metadata["device"], args.dry_run, now)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(results, path, metadata)
    print(f"\nwrote {path} ({metadata['seconds']:.0f} s)")
    tests = metadata["conformance_tests"]
    return 1 if tests["returncode"] not in (0, None) else 0


if __name__ == "__main__":
    sys.exit(main())
