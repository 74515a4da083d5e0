"""What the LayerNorm and RMSNorm kernels share.

Both norms see their input as a matrix of ``n_rows`` independent rows of ``n_cols`` elements (the
trailing ``normalized_shape`` dims flattened into one row width). This file holds the bookkeeping
around that view and the second stage of the backward pass:

* :func:`as_rows` gives the (rows, width) view the kernels index with a row stride;
* :func:`block_config` decides whether a row fits in one block of registers or needs the looped
  path, and how many warps a block gets;
* :func:`backward_programs` sizes the backward grid (also on the CPU, under the interpreter);
* :func:`sum_partials` adds the per-program weight-gradient partials in a fixed order, which is what
  makes dW and dB bit-for-bit reproducible without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from normlib.backends import triton_device_reason

# Rows of up to 64 KiB are held whole in one block of registers, as in Triton's layer-norm and
# softmax tutorials; past that a block would spill, so wider rows take the looped path, which walks
# the row in blocks of this size. Tests lower it (monkeypatch) to reach the looped path cheaply.
MAX_BLOCK_BYTES = 65536

# Heuristic from Triton's tutorials: about 256 elements of a row per warp of 32 threads, so each
# thread handles a handful of elements; at most 8 warps (256 threads), at least one.
ELEMENTS_PER_WARP = 256
MAX_WARPS = 8

# The backward kernel runs a fixed number of programs, each owning a private fp32 partial of dW
# (and dB). On a GPU, this many programs per streaming multiprocessor keeps every SM busy while the
# partials stay small (programs x width floats). Under the CPU interpreter programs run one after
# another, so a few suffice to exercise the second-stage sum.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4


def check_device(tensor: torch.Tensor, name: str) -> None:
    """Fail clearly where a launch would crash (an entry point called directly, not through
    normlib.backends): the rule is :func:`normlib.backends.triton_device_reason`'s."""
    reason = triton_device_reason(tensor.device)
    if reason is not None:
        raise RuntimeError(f"{name}: {reason}")


def as_rows(tensor: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``tensor`` as an (n_rows, n_cols) matrix whose columns are contiguous.

    ``reshape`` returns a view whenever the strides allow (so a row-strided input, e.g. a slice of
    a wider tensor, costs no copy: the kernels take the row stride) and copies otherwise. A last
    stride other than 1 (a transposed or expanded tensor, such as the all-ones gradient of ``sum``)
    is made contiguous, because the kernels assume adjacent columns are adjacent in memory.
    """
    rows = tensor.reshape(-1, n_cols)  # (n_rows, n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def block_config(n_cols: int, element_size: int) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE_BLOCK, num_warps) for rows of ``n_cols`` elements of ``element_size`` bytes.

    ``SINGLE_BLOCK`` is True when a whole row fits in one power-of-two block (the common case: one
    read of the row, statistics from registers); otherwise the kernels loop over blocks of
    ``BLOCK_N`` columns.
    """
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    max_block = max(1, triton.next_power_of_2(MAX_BLOCK_BYTES // element_size + 1) // 2)
    block = min(triton.next_power_of_2(n_cols), max_block)
    single_block = block >= n_cols
    num_warps = min(max(block // ELEMENTS_PER_WARP, 1), MAX_WARPS)
    return block, single_block, num_warps


def backward_programs(n_rows: int, device: torch.device) -> int:
    """How many programs the backward kernel runs (each accumulates its own dW/dB partial).

    Only a CUDA device is asked for its SM count: under the interpreter the tensor is on the CPU
    and ``torch.cuda`` may not even be compiled in.
    """
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, PROGRAMS_PER_SM * sm_count))
    return max(1, min(n_rows, INTERPRETER_PROGRAMS))


@triton.jit
def _sum_partials_kernel(
    PARTIAL,  # pointer to the fp32 partials, shape (n_partials, n_cols), contiguous
    OUT,  # pointer to the result, shape (n_cols,), in the parameter's dtype
    n_partials,  # number of partial rows to add (the backward's program count)
    n_cols,  # row width
    BLOCK_N: tl.constexpr,  # columns handled by one program
):
    # Each program owns BLOCK_N columns and walks the partial rows from first to last: the order of
    # the additions is fixed by the code, not by which program finishes first, so two runs give the
    # same bits. No atomics, no locks.
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Advancing a pointer row by row keeps the offset arithmetic in 64-bit pointers, whatever the
    # total size of the partials.
    partial_row = PARTIAL + cols
    for _ in range(0, n_partials):
        acc += tl.load(partial_row, mask=mask, other=0.0)
        partial_row += n_cols
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=mask)


# Whether @triton.jit defined this module's kernels (and those of the modules importing it, defined
# in the same import) for Triton's CPU interpreter rather than for the GPU: fixed from here on.
INTERPRETED = isinstance(_sum_partials_kernel, InterpretedFunction)


# Columns per program in the second stage: it streams n_partials x BLOCK floats per program, a
# small power of two keeps many programs in flight for narrow rows.
SUM_BLOCK = 128


def sum_partials(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Column sums of the fp32 ``partial`` (n_partials, n_cols), in a fixed order, in the shape and
    dtype of the parameter ``like`` (whose numel is n_cols)."""
    n_partials, n_cols = partial.shape
    out = torch.empty(like.shape, dtype=like.dtype, device=partial.device)
    grid = (triton.cdiv(n_cols, SUM_BLOCK),)
    _sum_partials_kernel[grid](partial, out, n_partials, n_cols, BLOCK_N=SUM_BLOCK)
    return out
