"""The kernels build for a real GPU, checked without one.

The interpreter tests run the kernels as NumPy code; they cannot see what only the compiler checks.
Here Triton compiles each kernel variant for an H100 (sm_90) all the way to a cubin, in a
subprocess with TRITON_INTERPRET=0 (the tests' conftest turns the interpreter on for this process).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend (Linux x86_64 wheels ship it)",
)

COMPILER_ENV = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}


def run_python(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=COMPILER_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_kernel_compiles_to_a_cubin_for_sm90():
    out = run_python("-m", "normlib.kernels.compile_check", "--quick", "--dtypes", "fp32", "bf16")
    assert "compiled 50 kernel variants for sm_90" in out  # 17 row-norm and 8 DyT variants per dtype


# Which PTX multiplications the row offsets use: 64-bit everywhere (row * stride must not wrap past
# 2**31 elements), no 32-bit multiply left, and no atomics in the backward (determinism).
PTX_CHECK = """
from normlib.kernels.compile_check import compile_kernel
from normlib.kernels.row_norm import _row_norm_bwd_kernel, _row_norm_fwd_kernel
everything = dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=1024, SINGLE_BLOCK=True)
looped_rms = dict(IS_RMS=True, HAS_WEIGHT=True, HAS_BIAS=False, BLOCK_N=256, SINGLE_BLOCK=False)
cases = [
    ("layer_norm_fwd", _row_norm_fwd_kernel, dict(IS_RMS=False, HAS_RESIDUAL=True, **everything)),
    ("layer_norm_bwd", _row_norm_bwd_kernel, dict(IS_RMS=False, HAS_DH=True, **everything)),
    ("rms_norm_fwd_looped", _row_norm_fwd_kernel, dict(HAS_RESIDUAL=True, **looped_rms)),
    ("rms_norm_bwd_looped", _row_norm_bwd_kernel, dict(HAS_DH=True, **looped_rms)),
]
for name, fn, constexprs in cases:
    ptx = compile_kernel(fn, "bf16", constexprs, 90).asm["ptx"]
    print(name, ptx.count("mul.lo.s64"), ptx.count("mul.lo.s32"), ptx.count("atom."))
"""


def test_row_offsets_are_64_bit_and_the_backward_has_no_atomics():
    lines = run_python("-c", PTX_CHECK).split()
    counts = {lines[i]: tuple(map(int, lines[i + 1 : i + 4])) for i in range(0, len(lines), 4)}
    assert len(counts) == 4
    for name, (mul64, mul32, atomics) in counts.items():
        assert mul64 >= 1 and mul32 == 0, f"{name}: 64-bit multiplies {mul64}, 32-bit {mul32}"
        assert atomics == 0, f"{name}: {atomics} atomic instructions"


def test_refuses_to_run_under_the_interpreter():
    env = {**COMPILER_ENV, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "normlib.kernels.compile_check", "--quick"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


def test_kernel_built_for_the_gpu_refuses_a_cpu_tensor_clearly():
    # Called directly (not through normlib's dispatch, which checks first), a kernel compiled for the
    # GPU must not be launched on CPU memory: a RuntimeError that names the fix, not a crash.
    code = (
        "import torch\n"
        "from normlib.kernels.rms_norm import rms_norm_triton\n"
        "try:\n"
        "    rms_norm_triton(torch.randn(2, 8), (8,), None, 1e-6)\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    out = run_python("-c", code)
    assert out.startswith("RuntimeError:") and "TRITON_INTERPRET=1" in out and "'cpu'" in out
