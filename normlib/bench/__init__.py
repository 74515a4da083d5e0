"""The benchmark: every available implementation of LayerNorm, RMSNorm and DyT, side by side.

    python -m normlib.bench                      # all ops, bf16 and fp32, hidden 1K..32K
    python -m normlib.bench --quick              # a tiny configuration (seconds, on a CPU)
    python -m normlib.bench --cpu-grid           # the CPU grid, with torch.compile
    python -m normlib.bench --ops rms_norm --dtypes bf16 --hidden 4096 8192 --rows 1 4096 --modes fwd
    python -m normlib.bench.gpu_check            # the GPU check: conformance tests, then the benchmark
    python -m normlib.bench --help

For each case (op, dtype, hidden size, rows, mode) it times, on one device:

* "torch.nn.functional": PyTorch's own op called directly, ``F.layer_norm`` or ``F.rms_norm``
  (the add_* ops and DyT have no functional twin). It is the baseline of the speed-up column;
* every backend in ``normlib.available_backends(op, device)``: ``"torch"`` is shown as
  "torch eager" (PyTorch's op behind normlib's Python dispatch, so its time over the functional
  op's is that dispatch's overhead); ``"cpu"`` and ``"triton"`` appear when they can run there
  (Triton's CPU interpreter is a correctness tool and is never timed);
* "composite": the op written as plain torch operations, run eagerly (one kernel per operation);
* "torch.compile": that composite compiled by ``torch.compile``, its compile time reported apart;
* "liger": Liger-Kernel's fused norms, where installed (``normlib/bench/peers.py``);
* and a copy of the same number of bytes, the reference of the "of copy" fraction.

=============  ==================================================================================
module         what it holds
=============  ==================================================================================
cases.py       the cases, the byte model, the implementations and their inputs
timing.py      timing in alternation, adaptive repeats, the copy reference, cache sizes
run.py         :func:`run_benchmark`: every implementation of every case
peers.py       other libraries' implementations (Liger-Kernel)
report.py      results, the table, comparisons within a run, CSV and JSON files
cli.py         ``python -m normlib.bench``
gpu_check.py   ``python -m normlib.bench.gpu_check`` (``make gpu-check``)
=============  ==================================================================================

Speed is printed, as ratios within one run, and never asserted.
"""

from normlib.bench.cases import (
    BACKEND_LABELS,
    COMPILED,
    COMPOSITE,
    COMPOSITES,
    DTYPES,
    EAGER,
    FUNCTIONAL,
    FUNCTIONALS,
    LAYER_NORM_EPS,
    LIGER,
    MODES,
    NORMLIB_CPU,
    OPS,
    TRITON,
    Case,
    CaseKey,
    add_layer_norm_composite,
    add_rms_norm_composite,
    baseline_of,
    bytes_moved,
    case_memory_bytes,
    case_name,
    dyt_composite,
    implementations,
    layer_norm_composite,
    make_inputs,
    normlib_call,
    op_inputs,
    rms_norm_composite,
    timed_step,
)
from normlib.bench.cli import main, parse_args
from normlib.bench.report import (
    TABLE_COLUMNS,
    TABLE_LEGEND,
    Result,
    against_peer,
    device_description,
    environment,
    format_seconds,
    format_table,
    layer_norm_overhead,
    read_json,
    table_rows,
    time_relative_to_layer_norm,
    write_csv,
    write_json,
)
from normlib.bench.run import case_results, run_benchmark
from normlib.bench.timing import (
    MAX_REPEATS,
    MIN_REPEATS,
    ROUNDS,
    TARGET_MEASUREMENT_SECONDS,
    WARMUP_CALLS,
    adaptive_repeats,
    copy_step,
    last_level_cache_bytes,
    measure_copy_bandwidth,
    time_interleaved,
)
