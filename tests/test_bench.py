"""``python -m normlib.bench``: that it runs and writes well-formed files. Nothing about speed is
asserted (timings depend on the machine and on what else it is doing)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from normlib import bench


def test_quick_run_writes_consistent_csv_and_json(tmp_path, capsys):
    prefix = tmp_path / "runs" / "quick.v1"  # a missing folder and a dot in the name
    assert bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--hidden", "64", "--output", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert "[1/4] layer_norm fp32 hidden=64 fwd: torch eager" in printed  # progress lines
    assert "implementation" in printed and "vs eager" in printed  # the table

    with open(f"{prefix}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(f"{prefix}.json") as f:
        document = json.load(f)
    assert [r["implementation"] for r in document["results"]] == [r["implementation"] for r in rows]
    cases = {(r["op"], r["mode"]) for r in rows}
    assert cases == {(op, mode) for op in ("layer_norm", "rms_norm") for mode in ("fwd", "fwd+bwd")}
    for row in rows:
        seconds, n_bytes = float(row["seconds"]), int(row["bytes_moved"])
        assert seconds > 0 and math.isfinite(seconds)
        assert n_bytes == bench.bytes_moved(row["op"], int(row["rows"]), int(row["hidden"]), 4, row["mode"])
        assert float(row["bandwidth_gbps"]) == pytest.approx(n_bytes / seconds / 1e9)
        assert 0 < float(row["peak_fraction"])
    for op, mode in cases:
        labels = [r["implementation"] for r in rows if (r["op"], r["mode"]) == (op, mode)]
        assert labels[0] == "torch eager" and "composite" in labels and "torch.compile" not in labels
        assert "triton" not in labels  # the interpreter (on in tests) is never timed
        eager = next(r for r in rows if (r["op"], r["mode"], r["implementation"]) == (op, mode, "torch eager"))
        assert float(eager["speedup_vs_eager"]) == 1.0
    metadata, results = bench.read_json(f"{prefix}.json")
    assert [r.seconds for r in results] == [float(r["seconds"]) for r in rows]
    assert metadata["device"].startswith("CPU") and metadata["peak_bandwidth_gbps"] > 0
    assert "read x" in metadata["byte_model"] and metadata["torch"] == torch.__version__


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
    make = lambda seconds: bench.Result("rms_norm", "fp32", 64, 8, "fwd", "torch eager", seconds, 100, 1.0, 0.5, 1.0)  # noqa: E731
    short, long = (bench.format_table([make(s)], align=False) for s in (1.5e-6, 123.4e-3))
    assert short.replace("1.5 µs", "T") == long.replace("123 ms", "T")


def test_help_and_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "normlib.bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--quick" in result.stdout and "--output" in result.stdout
    with pytest.raises(SystemExit):
        bench.parse_args(["--hidden", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])


def _result(op: str, implementation: str, seconds: float, mode: str = "fwd") -> bench.Result:
    return bench.Result(op=op, dtype="fp32", hidden=1024, rows=64, mode=mode, implementation=implementation,
                        seconds=seconds, bytes_moved=1, bandwidth_gbps=1.0, peak_fraction=None,
                        speedup_vs_eager=None)


def test_rms_norm_times_are_divided_by_layer_norm_eager_of_the_same_case():
    results = [
        _result("layer_norm", "torch eager", 2.0),
        _result("layer_norm", "composite", 5.0),
        _result("rms_norm", "torch eager", 6.0),
        _result("rms_norm", "normlib cpu", 2.5),
        _result("layer_norm", "torch eager", 10.0, mode="fwd+bwd"),
        _result("rms_norm", "normlib cpu", 5.0, mode="fwd+bwd"),
    ]
    lines = bench.time_relative_to_layer_norm(results)
    assert lines == [
        "rms_norm fp32 64x1024 fwd: torch eager 3.00x, normlib cpu 1.25x",
        "rms_norm fp32 64x1024 fwd+bwd: normlib cpu 0.50x",
    ]
    assert bench.time_relative_to_layer_norm([_result("rms_norm", "normlib cpu", 1.0)]) == []
