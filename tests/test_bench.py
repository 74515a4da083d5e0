"""``python -m normlib.bench``: that it runs and writes well-formed files. Nothing about speed is
asserted (timings depend on the machine and on what else it is doing)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch

from normlib import bench


def test_quick_run_writes_consistent_csv_and_json(tmp_path, capsys):
    prefix = tmp_path / "runs" / "quick.v1"  # a missing folder and a dot in the name
    argv = ["--quick", "--device", "cpu", "--repeats", "1", "--hidden", "64", "--rows", "2", "8", "--output", str(prefix)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    # one progress line per case, the functional op first
    assert "[1/8] layer_norm fp32 2x64 fwd: torch.nn.functional" in printed
    assert "[8/8] rms_norm fp32 8x64 fwd+bwd: torch.nn.functional" in printed
    assert "implementation" in printed and "speed-up" in printed and "Baseline: torch.nn.functional" in printed

    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(f"{prefix}.json") as f:
        document = json.load(f)
    assert [r["implementation"] for r in document["results"]] == [r["implementation"] for r in rows]
    assert document["metadata"]["rows"] == [2, 8]
    cases = {(r["op"], int(r["rows"]), r["mode"]) for r in rows}
    assert cases == {(op, n, mode) for op in ("layer_norm", "rms_norm") for n in (2, 8) for mode in ("fwd", "fwd+bwd")}
    for row in rows:
        seconds, n_bytes = float(row["seconds"]), int(row["bytes_moved"])
        assert seconds > 0 and math.isfinite(seconds)
        assert n_bytes == bench.bytes_moved(row["op"], int(row["rows"]), int(row["hidden"]), 4, row["mode"])
        assert float(row["bandwidth_gbps"]) == pytest.approx(n_bytes / seconds / 1e9)
        assert 0 < float(row["peak_fraction"])
        assert row["baseline"] == "torch.nn.functional"
    for op, n, mode in cases:
        case_rows = [r for r in rows if (r["op"], int(r["rows"]), r["mode"]) == (op, n, mode)]
        labels = [r["implementation"] for r in case_rows]
        assert labels[:2] == ["torch.nn.functional", "torch eager"] and "composite" in labels
        assert "torch.compile" not in labels and "triton" not in labels  # the interpreter is never timed
        functional = float(case_rows[0]["seconds"])
        for r in case_rows:
            assert float(r["speedup"]) == pytest.approx(functional / float(r["seconds"]))
    metadata, results = bench.read_json(f"{prefix}.json")
    assert [r.seconds for r in results] == [float(r["seconds"]) for r in rows]
    assert metadata["device"].startswith("CPU") and metadata["peak_bandwidth_gbps"] > 0
    assert "read x" in metadata["byte_model"] and metadata["torch"] == torch.__version__

    # The sections after the table: RMSNorm against F.layer_norm and F.rms_norm, LayerNorm's
    # dispatch overhead and, on the CPU, the targets.
    assert "layer_norm fp32 8x64 fwd+bwd: torch eager" in printed and "F.layer_norm's time (" in printed
    if "normlib cpu" in {r.implementation for r in results}:
        assert re.search(r"rms_norm fp32 2x64 fwd: .*; normlib cpu \d+\.\d\dx faster than F\.rms_norm", printed)
        assert re.search(r"targets met in \d of 4 cases", printed)


def test_byte_model_counts_each_stream():
    rows, hidden, fp32 = 8, 16, 4
    # LayerNorm forward: read x, write y, read weight and bias.
    assert bench.bytes_moved("layer_norm", rows, hidden, fp32, "fwd") == (2 * rows * hidden + 2 * hidden) * fp32
    # add_rms_norm forward: read x and r, write y and h, read the weight.
    assert bench.bytes_moved("add_rms_norm", rows, hidden, fp32, "fwd") == (4 * rows * hidden + hidden) * fp32
    # RMSNorm backward adds: read x and dy, write dx, read w, write dw.
    assert bench.bytes_moved("rms_norm", rows, hidden, 2, "fwd+bwd") == (
        (2 * rows * hidden + hidden) + (3 * rows * hidden + 2 * hidden)
    ) * 2


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA A100-SXM4-40GB", 1555.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("Tesla T4", 320.0),
        ("NVIDIA L4", 300.0),
        ("NVIDIA L40S", None),  # not an L4: unknown, not a wrong peak
    ],
)
def test_peak_bandwidth_table(name, peak):
    assert bench.peak_bandwidth_gbps(name)[0] == peak


def test_unaligned_table_does_not_depend_on_digit_counts():
    make = lambda seconds: bench.Result("rms_norm", "fp32", 64, 8, "fwd", "torch eager", seconds, 100, 1.0,  # noqa: E731
                                        0.5, 1.0, "torch eager")
    short, long = (bench.format_table([make(s)], align=False) for s in (1.5e-6, 123.4e-3))
    assert short.replace("1.5 µs", "T") == long.replace("123 ms", "T")


def test_help_and_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "normlib.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--quick" in result.stdout and "--output" in result.stdout
    assert "--cpu-grid" in result.stdout and "--memory-budget" in result.stdout
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])


def _result(op: str, implementation: str, seconds: float, mode: str = "fwd", rows: int = 64) -> bench.Result:
    return bench.Result(op=op, dtype="fp32", hidden=1024, rows=rows, mode=mode, implementation=implementation,
                        seconds=seconds, bytes_moved=1, bandwidth_gbps=1.0, peak_fraction=None, speedup=None)


def test_rms_norm_times_are_divided_by_f_layer_norm_of_the_same_case():
    results = [
        _result("layer_norm", "torch.nn.functional", 2.0),
        _result("layer_norm", "torch eager", 2.5),
        _result("rms_norm", "torch.nn.functional", 6.0),
        _result("rms_norm", "normlib cpu", 2.5),
        _result("layer_norm", "torch.nn.functional", 10.0, mode="fwd+bwd"),
        _result("rms_norm", "composite", 5.0, mode="fwd+bwd"),
        _result("layer_norm", "torch.nn.functional", 1.0, rows=8),  # another tensor: not a baseline
    ]
    assert bench.time_relative_to_layer_norm(results) == [
        "rms_norm fp32 64x1024 fwd: torch.nn.functional 3.00x, normlib cpu 1.25x of F.layer_norm's time; "
        "normlib cpu 2.40x faster than F.rms_norm",
        "rms_norm fp32 64x1024 fwd+bwd: composite 0.50x of F.layer_norm's time",
    ]
    assert bench.time_relative_to_layer_norm([_result("rms_norm", "normlib cpu", 1.0)]) == []
    assert bench.layer_norm_overhead(results) == [
        "layer_norm fp32 64x1024 fwd: torch eager 1.25x F.layer_norm's time (+500000.0 µs)"
    ]


def test_targets_mark_each_case_and_count_the_misses():
    results = [
        # forward: 1.2x F.layer_norm (<= 1.25x) and 2.5x faster than F.rms_norm (>= 2x): OK
        _result("layer_norm", "torch.nn.functional", 10.0),
        _result("rms_norm", "torch.nn.functional", 30.0),
        _result("rms_norm", "normlib cpu", 12.0),
        # fwd+bwd: 1.4x F.layer_norm (> 1.3x) though 3x faster than F.rms_norm: MISS
        _result("layer_norm", "torch.nn.functional", 10.0, mode="fwd+bwd"),
        _result("rms_norm", "torch.nn.functional", 42.0, mode="fwd+bwd"),
        _result("rms_norm", "normlib cpu", 14.0, mode="fwd+bwd"),
        # 1.0x F.layer_norm but only 1.5x faster than F.rms_norm: MISS
        _result("layer_norm", "torch.nn.functional", 10.0, rows=1),
        _result("rms_norm", "torch.nn.functional", 15.0, rows=1),
        _result("rms_norm", "normlib cpu", 10.0, rows=1),
        # no F.layer_norm for this tensor: not checked, not counted
        _result("rms_norm", "torch.nn.functional", 15.0, rows=2),
        _result("rms_norm", "normlib cpu", 1.0, rows=2),
    ]
    lines = bench.rms_norm_targets(results)
    assert lines[0].startswith("OK   rms_norm fp32 64x1024 fwd: 1.20x F.layer_norm's time (target <= 1.25x), "
                               "2.50x faster than F.rms_norm")
    assert lines[1].startswith("MISS rms_norm fp32 64x1024 fwd+bwd: 1.40x F.layer_norm's time (target <= 1.3x)")
    assert lines[2].startswith("MISS rms_norm fp32 1x1024 fwd: 1.00x")
    assert lines[3:] == [
        "targets met in 1 of 3 cases",
        "misses:",
        "  rms_norm fp32 64x1024 fwd+bwd: 1.40x F.layer_norm > 1.3x",
        "  rms_norm fp32 1x1024 fwd: only 1.50x faster than F.rms_norm < 2x",
    ]
    assert bench.rms_norm_targets(results[:3])[-1] == "targets met in 1 of 1 cases"
    assert bench.rms_norm_targets(results[9:])[0].startswith("no case to check")


def test_several_rows_and_the_cpu_grid_preset():
    args = bench.parse_args(["--device", "cpu", "--rows", "1", "4096", "--hidden", "256"])
    assert args.rows == [1, 4096] and args.hidden == [256]
    assert args.repeats is None  # adaptive on the CPU
    assert bench.parse_args(["--device", "cpu"]).rows == [256]

    grid = bench.parse_args(["--cpu-grid"])
    assert grid.device == torch.device("cpu") and grid.compile is False and grid.repeats is None
    assert grid.ops == ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
    assert grid.dtypes == ["fp32", "bf16"] and grid.modes == ["fwd", "fwd+bwd"]
    assert grid.hidden == [256, 1024, 4096, 8192] and grid.rows == [1, 16, 256, 4096, 16384]
    assert grid.memory_budget == 2.0
    # options given explicitly override the preset
    narrowed = bench.parse_args(["--cpu-grid", "--hidden", "256", "1024", "--rows", "1", "256", "--repeats", "7"])
    assert narrowed.hidden == [256, 1024] and narrowed.rows == [1, 256] and narrowed.repeats == 7
    assert narrowed.dtypes == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-grid", "--quick"])


def test_adaptive_repeats_fill_the_target_time_within_bounds():
    for seconds in (2e-3, 1e-3, 3e-4):
        repeats = bench.adaptive_repeats(seconds, target_seconds=0.3, minimum=5, maximum=1000)
        assert 0.3 <= repeats * seconds < 0.3 + seconds
    assert bench.adaptive_repeats(1e-6, target_seconds=0.3, minimum=5, maximum=1000) == 1000
    assert bench.adaptive_repeats(0.0, target_seconds=0.3, minimum=5, maximum=1000) == 1000
    assert bench.adaptive_repeats(2.0, target_seconds=0.3, minimum=5, maximum=1000) == 5


def test_implementations_are_timed_in_alternating_rounds():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.time_interleaved(steps, repeats=4, rounds=3)
    warmup = bench.WARMUP_CALLS
    assert calls[: 2 * warmup] == ["a"] * warmup + ["b"] * warmup
    # 4 runs in 3 rounds: 2, 1, 1 each, alternating
    assert "".join(calls[2 * warmup:]) == "aabbabab"
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())


def test_cases_over_the_memory_budget_are_skipped_with_a_note():
    printed = []
    results = bench.run_benchmark(["rms_norm"], ["fp32"], [64], [2, 4], ["fwd"], device=torch.device("cpu"),
                                  repeats=1, memory_budget_bytes=2 * 4 * 64 * 3, progress=printed.append)
    assert {r.rows for r in results} == {2}  # 2 rows: 1 KiB of x and y; 4 rows: 2 KiB, over
    assert any("4x64 fwd: skipped" in line and "memory budget" in line for line in printed)


def test_all_ops_on_one_tensor_are_timed_in_one_group(monkeypatch):
    groups = []
    timer = bench.time_interleaved
    monkeypatch.setattr(bench, "time_interleaved",
                        lambda steps, *args, **kwargs: groups.append(list(steps)) or timer(steps, *args, **kwargs))
    results = bench.run_benchmark(["layer_norm", "rms_norm"], ["fp32"], [32], [2], ["fwd", "fwd+bwd"],
                                  device=torch.device("cpu"), repeats=1, progress=None)
    # one group per mode, each holding both ops' implementations, the functional ops among them
    assert [sorted({case.op for case, _ in group}) for group in groups] == [["layer_norm", "rms_norm"]] * 2
    assert all((case.op, "torch.nn.functional") in {(c.op, label) for c, label in group}
               for group in groups for case, _ in group)
    # results in case order: op first, then mode
    assert [(r.op, r.mode) for r in results if r.implementation == "torch.nn.functional"] == [
        ("layer_norm", "fwd"), ("layer_norm", "fwd+bwd"), ("rms_norm", "fwd"), ("rms_norm", "fwd+bwd")]


def test_a_slow_first_call_does_not_pass_for_the_step_time():
    calls = []

    def step():  # a one-time cost on the first call (lazy init, compile), then fast
        if not calls:
            time.sleep(bench.TARGET_MEASUREMENT_SECONDS * 1.5)
        calls.append(1)

    bench.time_interleaved({"step": step}, repeats=None)
    assert len(calls) >= bench.WARMUP_CALLS + 100  # measured on the warm calls: many repeats


@pytest.mark.parametrize(
    "seconds, text",
    [(2.5, "2.5 s"), (0.0123, "12.3 ms"), (9.997e-4, "1 ms"), (999.4e-6, "999 µs"), (3e-6, "3 µs"),
     (9.9996e-7, "1 µs"), (4.2e-9, "4.2 ns"), (0.0, "0 ns")],
)
def test_format_seconds_picks_the_unit_after_rounding(seconds, text):
    # "1e+03 µs" would escape the notebooks' sanitize pattern for timings
    assert bench.format_seconds(seconds) == text
