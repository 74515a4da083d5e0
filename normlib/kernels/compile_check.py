"""Compile every kernel for a GPU architecture without a GPU: ``python -m normlib.kernels.compile_check``.

The interpreter that runs the kernels on the CPU in CI executes them as NumPy code; it does not
type-check them the way the compiler does (loop-carried values that change type, constexpr
branches that do not lower, pointer arithmetic). Triton can compile ahead of time for a target it
is not running on, through its whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and a cubin from the
bundled ptxas), so this check proves on any Linux machine that each kernel variant builds for a
real GPU. It says nothing about speed, and running is still checked only by the interpreter tests
(or on a GPU).

Must run with ``TRITON_INTERPRET=0`` (the default): with the interpreter on, ``@triton.jit`` builds
interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import sys
from typing import Optional, Sequence

POINTERS = ("X", "R", "H", "Y", "W", "B", "DY", "DH", "DX", "OUT", "ALPHA")
FP32_POINTERS = ("MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL", "PARTIAL", "DALPHA_PARTIAL")
INTS = ("stride_x", "stride_r", "stride_dy", "stride_dh", "n_cols", "n_rows", "n_partials")


def compile_kernel(fn, dtype: str, constexprs: dict, capability: int, num_warps: int = 4):
    """Compile the @triton.jit ``fn`` with data pointers of ``dtype`` (e.g. "bf16") for CUDA
    compute ``capability`` (e.g. 90 for H100) and return the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**{p: f"*{dtype}" for p in POINTERS}, **{p: "*fp32" for p in FP32_POINTERS},
             **{i: "i32" for i in INTS}, "eps": "fp32"}
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constexprs.items()})
    else:  # Triton 3.2 takes the constexprs' values by name
        source = ASTSource(fn=fn, signature=signature, constants=dict(constexprs))
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def variants(quick: bool):
    """(kernel, constexprs) pairs: LayerNorm and RMSNorm (``IS_RMS``), every flag combination the
    ops use (RMSNorm has no bias), single-block and looped paths; the second-stage sum; DyT with
    and without weight and bias."""
    from normlib.kernels import _rows, dyt, row_norm

    flags = [(True, True, True), (False, False, False)] if quick else list(itertools.product([False, True], repeat=3))
    blocks = [(1024, True), (256, False)] if quick else [(1024, True), (256, False), (1, True)]
    for (block, single), is_rms in itertools.product(blocks, (False, True)):
        shape = dict(IS_RMS=is_rms, BLOCK_N=block, SINGLE_BLOCK=single)
        for a, b, c in dict.fromkeys((a, b, c and not is_rms) for a, b, c in flags):
            yield row_norm._row_norm_fwd_kernel, dict(HAS_RESIDUAL=a, HAS_WEIGHT=b, HAS_BIAS=c, **shape)
            yield row_norm._row_norm_bwd_kernel, dict(HAS_DH=a, HAS_WEIGHT=b, HAS_BIAS=c, **shape)
    yield _rows._sum_partials_kernel, dict(BLOCK_N=_rows.SUM_BLOCK)
    for has_weight, has_bias in itertools.product([False, True], repeat=2):
        for block in (1024,) if quick else (1024, 256):
            constexprs = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_N=block)
            yield dyt._dyt_fwd_kernel, constexprs
            yield dyt._dyt_bwd_kernel, constexprs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normlib.kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="CUDA compute capability, e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="fewer flag combinations (for the tests)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels are interpreted functions and cannot be compiled")
    count = 0
    for dtype in args.dtypes:
        for fn, constexprs in variants(args.quick):
            kernel = compile_kernel(fn, dtype, constexprs, args.capability)
            if "cubin" not in kernel.asm:
                raise RuntimeError(f"{fn.__name__} {dtype} {constexprs}: no cubin was produced")
            count += 1
    print(f"compiled {count} kernel variants for sm_{args.capability} (dtypes {' '.join(args.dtypes)}) to cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
