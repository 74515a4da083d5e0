"""Builds and loads ``rms_norm.c`` (the fused kernels) and calls them on torch tensors.

The C file is compiled with the system C compiler the first time it is needed, into a cache
directory keyed by the source, the flags, the compiler and the CPU, and then loaded with ctypes.
Measured on the course machine (busy with other work), the first call in a fresh process took
0.6-0.8 s with an empty cache and 10-20 ms with a warm one; torch.compile needs ~21 s and numba 3-4 s per kernel for the same job,
both over the 2 s a notebook's first call may stall. Without a C compiler, :func:`library` returns
None with a reason, and the callers use the pure-PyTorch blocked path instead.

ctypes releases the GIL during the call, and the kernels start their own threads (pthreads), so
the op uses ``torch.get_num_threads()`` cores like PyTorch's own ops do.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("rms_norm.c")
# -march=native: the build is for this CPU only (the cache key includes the CPU's flags);
# -fopenmp-simd: honour the `omp simd` loop pragmas without linking an OpenMP runtime, which
# would fight PyTorch's own; no -ffast-math, so NaN and infinity propagate as in PyTorch.
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]

STORAGE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Each thread gets at least this many elements. Starting and joining a thread cost 25-60 us on the
# course machine (a VM), so a second thread only pays off on large tensors. Measured forward of
# (rows, 1024) float32, one thread vs two, median us: 512 rows 86 vs 121, 1024 rows 156 vs 168,
# 2048 rows 425 vs 342, 4096 rows 1799 vs 810.
_ELEMENTS_PER_THREAD = 1 << 19

_why_unavailable: str | None = None


def _cpu_signature() -> str:
    """The CPU's feature flags: a -march=native build must not be reused on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NORMLIB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlib"
    )
    return Path(root)


def _compile(compiler: str, target: Path) -> None:
    """Compiles into a temporary file first, then renames: concurrent processes never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        os.replace(partial, target)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.normlib_rms_norm_forward.argtypes = [i32, p, p, p, p, p, p, i64, i64, f32, i32]
    lib.normlib_rms_norm_forward.restype = i32
    lib.normlib_rms_norm_backward.argtypes = [i32, p, p, p, p, p, p, p, i64, i64, i32]
    lib.normlib_rms_norm_backward.restype = i32
    lib.normlib_has_float16.argtypes = []
    lib.normlib_has_float16.restype = i32
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (and :func:`unavailable_reason` says why)."""
    global _why_unavailable
    if sys.platform == "win32":
        _why_unavailable = "the fused C kernels are built with a POSIX C compiler (not on Windows)"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not SOURCE.exists():
        _why_unavailable = f"no C compiler found (tried $CC, cc, gcc) or {SOURCE.name} is missing"
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()]).encode()
        ).hexdigest()[:16]
        name = f"rms_norm_{key}.so"
        target = _cache_dir() / name
        if not target.exists():
            try:
                _compile(compiler, target)
            except PermissionError:  # a read-only home: build per user in the temporary directory
                target = Path(tempfile.gettempdir()) / f"normlib-{os.getuid()}" / name
                if not target.exists():
                    _compile(compiler, target)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _why_unavailable = f"building {SOURCE.name} failed: {detail.strip()[:500]}"
        return None


def unavailable_reason() -> str | None:
    library()
    return _why_unavailable


def supports(dtype: torch.dtype) -> bool:
    """Whether the C kernels can store ``dtype`` (float16 only with a compiler that has _Float16)."""
    lib = library()
    if lib is None or dtype not in STORAGE_CODES:
        return False
    return dtype != torch.float16 or _has_float16(lib)


@cache
def _has_float16(lib: ctypes.CDLL) -> bool:
    return bool(lib.normlib_has_float16())


def _threads(elements: int) -> int:
    return max(1, min(torch.get_num_threads(), elements // _ELEMENTS_PER_THREAD))


def rms_norm_forward(
    x: Tensor,  # (rows, n) contiguous, float32/bfloat16/float16
    residual: Tensor | None,  # (rows, n) contiguous, x's dtype, or None
    gamma: Tensor,  # (n,) float32 contiguous
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Returns ``(y, h, rstd)``: y and h (None without residual) in x's dtype, rstd (rows,) float32."""
    rows, n = x.shape
    y = torch.empty_like(x)
    h = None if residual is None else torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32)
    library().normlib_rms_norm_forward(
        STORAGE_CODES[x.dtype], x.data_ptr(), None if residual is None else residual.data_ptr(),
        None if h is None else h.data_ptr(), gamma.data_ptr(), y.data_ptr(), rstd.data_ptr(),
        rows, n, eps, _threads(rows * n),
    )
    return y, h, rstd


def rms_norm_backward(
    dy: Tensor,  # (rows, n) contiguous, x's dtype
    dh: Tensor | None,  # (rows, n) contiguous or None
    x: Tensor,  # (rows, n) contiguous: what was normalized
    rstd: Tensor,  # (rows,) float32
    gamma: Tensor,  # (n,) float32 contiguous
    needs_dx: bool,
    needs_dgamma: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Returns ``(dx, dgamma)``, dx in x's dtype, dgamma float32 (None where not needed)."""
    rows, n = x.shape
    threads = _threads(rows * n)
    dx = torch.empty_like(x) if needs_dx else None
    # one row of dgamma per thread, summed here; with one thread that row is dgamma itself
    parts = torch.zeros((threads, n) if threads > 1 else n, dtype=torch.float32) if needs_dgamma else None
    library().normlib_rms_norm_backward(
        STORAGE_CODES[x.dtype], dy.data_ptr(), None if dh is None else dh.data_ptr(), x.data_ptr(),
        rstd.data_ptr(), gamma.data_ptr(), None if dx is None else dx.data_ptr(),
        None if parts is None else parts.data_ptr(), rows, n, threads,
    )
    return dx, parts if parts is None or threads == 1 else parts.sum(0)
