"""``python -m normlib.bench`` and ``python -m normlib.bench.gpu_check``: that they run and write
well-formed files. Nothing about speed is asserted (timings depend on the machine and on what else
it is doing)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import normlib
from normlib import bench
from normlib.bench import gpu_check, peers
from normlib.bench import run as bench_run


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
        assert 0 < float(row["peak_fraction"]) <= 1  # of a copy of the same bytes, never above it
        assert float(row["copy_gbps"]) > 0
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
    assert metadata["device"].startswith("CPU") and metadata["last_level_cache_bytes"] != 0
    assert "read x" in metadata["byte_model"] and metadata["torch"] == torch.__version__

    # The sections after the table: RMSNorm against F.layer_norm and F.rms_norm, LayerNorm's
    # dispatch overhead and, on the CPU, the targets.
    assert "layer_norm fp32 8x64 fwd+bwd: torch eager" in printed and "F.layer_norm's time (" in printed
    if "normlib cpu" in {r.implementation for r in results}:
        assert re.search(r"rms_norm fp32 2x64 fwd: .*; normlib cpu \d+\.\d\dx faster than F\.rms_norm", printed)
    assert "% of copy" in printed and "% of peak" not in printed


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
    # DyT reads x, weight and bias and writes y, as LayerNorm does.
    assert bench.bytes_moved("dyt", rows, hidden, fp32, "fwd") == bench.bytes_moved("layer_norm", rows, hidden, fp32, "fwd")


def test_unaligned_table_does_not_depend_on_digit_counts():
    make = lambda seconds: bench.Result("rms_norm", "fp32", 64, 8, "fwd", "torch eager", seconds, 100, 1.0,  # noqa: E731
                                        0.5, 1.0, "torch eager", 2.0)
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


def test_several_rows_and_the_cpu_grid_preset():
    args = bench.parse_args(["--device", "cpu", "--rows", "1", "4096", "--hidden", "256"])
    assert args.rows == [1, 4096] and args.hidden == [256]
    assert args.repeats is None  # adaptive on the CPU
    assert bench.parse_args(["--device", "cpu"]).rows == [256]

    grid = bench.parse_args(["--cpu-grid"])
    assert grid.device == torch.device("cpu") and grid.compile is True and grid.repeats is None
    assert grid.ops == ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dyt"]
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
    monkeypatch.setattr(bench_run, "time_interleaved",
                        lambda steps, *args, **kwargs: groups.append(list(steps)) or timer(steps, *args, **kwargs))
    results = bench.run_benchmark(["layer_norm", "rms_norm"], ["fp32"], [32], [2], ["fwd", "fwd+bwd"],
                                  device=torch.device("cpu"), repeats=1, progress=None)
    # one group per mode, each holding both ops' implementations, the functional ops among them,
    # and the copy of each case's bytes
    cases = [[key for key in group if key[0] != bench_run.COPY] for group in groups]
    assert [sorted({case.op for case, _ in group}) for group in cases] == [["layer_norm", "rms_norm"]] * 2
    assert all((case.op, "torch.nn.functional") in {(c.op, label) for c, label in group}
               for group in cases for case, _ in group)
    assert all(any(key[0] == bench_run.COPY for key in group) for group in groups)
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


# ------------------------------------------------------------------------------------------------
# The copy reference, torch.compile, peers and DyT
# ------------------------------------------------------------------------------------------------


def test_fraction_of_copy_is_capped_at_one_and_marked():
    case = bench.Case("rms_norm", "fp32", 1024, 64, "fwd")
    n_bytes = bench.bytes_moved("rms_norm", 64, 1024, 4, "fwd")
    copy_gbps = n_bytes / 2e-6 / 1e9  # the copy of these bytes took 2 µs
    slow, fast = bench.case_results(case, {"torch eager": 4e-6, "normlib cpu": 1e-6}, copy_gbps, cache_resident=True)
    assert slow.peak_fraction == pytest.approx(0.5) and not slow.above_copy
    assert fast.peak_fraction == 1.0 and fast.above_copy  # twice the copy's bandwidth: capped, marked
    cells = bench.table_rows([slow, fast])
    assert cells[0][8] == "50% of copy (cache)" and cells[1][8] == "100% of copy (cache)"
    assert bench.case_results(case, {"torch eager": 4e-6}, None)[0].peak_fraction is None


def test_compile_time_is_reported_apart_from_the_run_time(monkeypatch):
    first_call_seconds = 0.3

    def fake_compile(fn, **_options):  # a "compiler" whose first call is slow, like a real compile
        calls = []

        def compiled(*args):
            if not calls:
                time.sleep(first_call_seconds)
            calls.append(1)
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    results = bench.run_benchmark(["rms_norm"], ["fp32"], [32], [4], ["fwd", "fwd+bwd"], device=torch.device("cpu"),
                                  repeats=3, compile=True, progress=None)
    compiled = [r for r in results if r.implementation == "torch.compile"]
    assert len(compiled) == 2
    for r in compiled:
        assert r.compile_seconds >= first_call_seconds * 0.9 and r.seconds < first_call_seconds / 2
    assert all(r.compile_seconds is None for r in results if r.implementation != "torch.compile")
    lines = bench.against_peer(results, "torch.compile")
    if any(r.implementation == "normlib cpu" for r in results):
        assert re.match(r"(ahead |behind) rms_norm fp32 4x32 fwd: normlib cpu \d+\.\d\dx torch.compile's time", lines[0])
        assert lines[-2].startswith("normlib at most torch.compile's time in ") and lines[-2].endswith(" of 2 cases")
    assert lines[-1].startswith("torch.compile compile time, apart from the run times above: ")
    # compile_dtypes limits the compiles (seconds per shape on a real compiler) to some dtypes
    limited = bench.run_benchmark(["rms_norm"], ["bf16", "fp32"], [32], [4], ["fwd"], device=torch.device("cpu"),
                                  repeats=1, compile=True, compile_dtypes=["bf16"], progress=None)
    assert {r.dtype for r in limited if r.implementation == "torch.compile"} == {"bf16"}
    assert {r.dtype for r in limited if r.implementation == "composite"} == {"bf16", "fp32"}


def test_against_peer_counts_the_cases_ahead():
    results = [_result("rms_norm", "normlib cpu", 1.0), _result("rms_norm", "liger", 2.0),
               _result("rms_norm", "normlib cpu", 3.0, mode="fwd+bwd"), _result("rms_norm", "liger", 2.0, mode="fwd+bwd"),
               _result("layer_norm", "liger", 1.0)]  # no normlib kernel for this case: not counted
    assert bench.against_peer(results, "liger") == [
        "ahead  rms_norm fp32 64x1024 fwd: normlib cpu 0.50x liger's time (1 s vs 2 s)",
        "behind rms_norm fp32 64x1024 fwd+bwd: normlib cpu 1.50x liger's time (3 s vs 2 s)",
        "normlib at most liger's time in 1 of 2 cases",
    ]
    assert bench.against_peer(results[:1], "liger") == []


def test_a_failing_peer_is_reported_and_the_others_still_timed():
    def broken(*_args):
        raise RuntimeError("no GPU for this peer")

    printed = []
    results = bench.run_benchmark(["layer_norm"], ["fp32"], [32], [2], ["fwd"], device=torch.device("cpu"), repeats=1,
                                  peers=lambda op: {"liger": broken}, progress=printed.append)
    assert "liger" not in {r.implementation for r in results} and "torch eager" in {r.implementation for r in results}
    assert "liger failed (RuntimeError: no GPU for this peer)" in printed[0]


def test_dyt_case_runs_and_skips_with_a_reason_where_normlib_lacks_it(monkeypatch):
    printed = []
    if hasattr(normlib, "dyt"):
        results = bench.run_benchmark(["dyt"], ["fp32"], [16], [2], ["fwd", "fwd+bwd"], device=torch.device("cpu"),
                                      repeats=1, progress=printed.append)
        assert {"torch eager", "composite"} <= {r.implementation for r in results}
        assert all(r.baseline == "torch eager" for r in results)
        monkeypatch.delattr(normlib, "dyt")
    printed.clear()
    assert bench.run_benchmark(["dyt"], ["fp32"], [16], [2], ["fwd"], device=torch.device("cpu"), repeats=1,
                               progress=printed.append) == []
    assert printed == ["dyt: skipped, normlib has no dyt() in this version"]


def test_cases_past_the_deadline_are_skipped_with_a_note():
    printed = []
    results = bench.run_benchmark(["rms_norm"], ["fp32"], [16], [2, 4], ["fwd"], device=torch.device("cpu"),
                                  repeats=1, deadline=time.monotonic() - 1, progress=printed.append)
    assert results == [] and printed == ["[1/2] rms_norm fp32 2x16 fwd: skipped, out of time",
                                         "[2/2] rms_norm fp32 4x16 fwd: skipped, out of time"]


def test_a_wheel_brought_along_is_importable_without_installing(tmp_path, monkeypatch):
    wheel = tmp_path / "fake_peer-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_peer_for_normlib/__init__.py", "ANSWER = 42\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = peers.use_wheel(wheel)
    assert str(folder) == sys.path[-1]
    import fake_peer_for_normlib

    assert fake_peer_for_normlib.ANSWER == 42
    with pytest.raises(ValueError, match="--liger-wheel must be an existing .whl file"):
        peers.use_wheel(tmp_path / "missing.whl")


def test_liger_is_optional():
    reason = peers.liger_unavailable_reason()
    if reason is None:
        assert set(peers.liger_implementations("rms_norm")) == {"liger"}
    else:
        assert "--liger-wheel" in reason and peers.liger_implementations("rms_norm") == {}


# ------------------------------------------------------------------------------------------------
# The GPU check
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run_file(tmp_path_factory):
    """The results file of ``gpu_check --dry-run``: tiny sizes, the Triton kernels interpreted."""
    folder = tmp_path_factory.mktemp("gpu")
    assert gpu_check.main(["--dry-run", "--output-dir", str(folder)]) == 0
    (path,) = folder.glob("*.json")
    return path


def test_gpu_check_dry_run_writes_a_results_file(dry_run_file):
    assert re.fullmatch(r"dry-run-[a-z0-9-]+-\d{4}-\d{2}-\d{2}\.json", dry_run_file.name)
    metadata, results = bench.read_json(dry_run_file)
    for key in ("device", "driver", "torch", "triton", "python", "date_utc", "cuda", "liger_kernel", "goal",
                "conformance_tests", "shapes", "seconds", "budget_seconds"):
        assert key in metadata, key
    assert metadata["dry_run"] is True and metadata["torch"] == torch.__version__
    tests = metadata["conformance_tests"]
    assert tests["returncode"] == 0 and "passed" in tests["summary"] and "tests/test_conformance.py" in tests["command"]
    assert metadata["goal"]["copy_fraction"] == gpu_check.GOAL_COPY_FRACTION and metadata["goal"]["lines"]
    implementations = {r.implementation for r in results}
    assert {"torch eager", "composite"} <= implementations
    if "triton" in normlib.available_backends("layer_norm", torch.device("cpu")):
        assert "triton" in implementations  # the interpreter, timed only in the dry run
    for r in results:
        assert r.bytes_moved == bench.bytes_moved(r.op, r.rows, r.hidden, bench.DTYPES[r.dtype].itemsize, r.mode)
        assert 0 < r.peak_fraction <= 1 and r.copy_gbps > 0
    assert {(r.hidden, r.rows) for r in results} == {tuple(s) for s in metadata["shapes"]}


def test_gpu_check_results_plot_with_device_and_date(dry_run_file):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from normlib.book import kernel_results

    if "triton" not in normlib.available_backends("layer_norm", torch.device("cpu")):
        pytest.skip("the dry run timed no Triton kernel here: the figure has nothing to plot")

    runs = kernel_results.load_runs([dry_run_file])
    assert len(runs) == 1 and runs[0].label.startswith(runs[0].metadata["device"])
    assert runs[0].metadata["date_utc"][:10] in runs[0].label
    figure = kernel_results.plot_runs(runs, dtype="bf16")
    titles = [ax.get_title() for ax in figure.axes]
    assert any("RMSNorm" in t for t in titles) or any("LayerNorm" in t for t in titles)
    assert all(ax.get_ylabel() for ax in figure.axes if ax.has_data())
    legend_texts = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
    assert any(runs[0].label in text for text in legend_texts)
    assert kernel_results.plot_runs([], dtype="bf16") is None


def test_goal_lines_mark_each_case():
    def result(implementation, seconds, fraction, hidden=4096, op="rms_norm"):
        return bench.Result(op, "bf16", hidden, 4096, "fwd+bwd", implementation, seconds, 1, 1.0, fraction, None)

    results = [result("triton", 1.0, 0.9), result("torch.compile", 1.2, 0.8), result("liger", 1.1, 0.85),
               result("triton", 1.0, 0.8, hidden=8192), result("torch.compile", 0.5, 0.9, hidden=8192),
               result("triton", 1.0, 0.95, hidden=1024)]  # below 4K features: not part of the goal
    assert gpu_check.goal_lines(results) == [
        "MET  rms_norm bf16 4096x4096 fwd+bwd: 90% of copy",
        "MISS rms_norm bf16 4096x8192 fwd+bwd: 80% of copy, below 85%; 2.00x torch.compile's time",
        "goal met in 1 of 2 cases",
    ]
    assert gpu_check.goal_lines([])[0].startswith("no case for the goal")


def test_gpu_check_results_path_and_arguments(tmp_path):
    now = __import__("datetime").datetime(2026, 1, 2, 3, 4)
    assert gpu_check.results_path(tmp_path, "NVIDIA H200", False, now) == tmp_path / "nvidia-h200-2026-01-02.json"
    assert gpu_check.results_path(tmp_path, "CPU (x86_64, 2 threads)", True, now).name == \
        "dry-run-cpu-x86-64-2-threads-2026-01-02.json"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])  # no GPU and no --dry-run: a clear error, not a CPU benchmark
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--budget", "0"])
    result = subprocess.run([sys.executable, "-m", "normlib.bench.gpu_check", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--liger-wheel" in result.stdout


def test_book_extra_installs_triton_only_where_it_has_wheels():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (triton_req,) = [Requirement(r) for r in extras["book"] if Requirement(r).name == "triton"]
    assert triton_req.marker.evaluate({"platform_system": "Linux", "platform_machine": "x86_64"})
    for system, machine in [("Darwin", "arm64"), ("Windows", "AMD64"), ("Linux", "aarch64")]:
        assert not triton_req.marker.evaluate({"platform_system": system, "platform_machine": machine})


def test_a_sample_can_batch_calls_between_synchronizations():
    calls, syncs = [], []

    def step():  # about 1 ms a call
        time.sleep(1e-3)
        calls.append(1)

    times = bench.time_interleaved({"step": step}, repeats=3, rounds=1, sync=lambda: syncs.append(1),
                                   min_sample_seconds=5e-3)
    # warm-up calls are synchronized one by one, then 3 samples of about 5 calls share a sync each
    assert len(calls) >= len(syncs) + 6
    assert 0.5e-3 < times["step"] < 5e-3  # a per-call time, not a per-sample one


def test_gpu_check_grid_spans_the_sizes_the_goal_needs():
    features = sorted(hidden for hidden, _ in gpu_check.SHAPES)
    assert features[0] == 1024 and features[-1] == 32768
    assert all(4096 <= rows <= 16384 for _, rows in gpu_check.SHAPES)
    assert sum(hidden >= gpu_check.GOAL_MIN_HIDDEN for hidden in features) >= 3
    assert set(gpu_check.OPS) == {"layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"}
    assert gpu_check.DTYPES[0] == gpu_check.GOAL_DTYPE and set(gpu_check.DTYPES) == {"bf16", "fp16", "fp32"}
    assert gpu_check.GOAL_DTYPE in gpu_check.COMPILE_DTYPES and set(gpu_check.MODES) == set(bench.MODES)
    assert gpu_check.BUDGET_SECONDS < 8 * 60
