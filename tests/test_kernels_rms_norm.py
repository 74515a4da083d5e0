"""The fused Triton RMSNorm kernels against the "torch" backend.

Run on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported): sizes stay tiny, and the looped path is reached by lowering the block limit.
"""

from __future__ import annotations

import pytest
import torch

import normlib

pytest.importorskip("triton")

from normlib.kernels import _rows  # noqa: E402  (after the importorskip)
from normlib.kernels import rms_norm as kernels  # noqa: E402

# Per-dtype tolerances (rtol, atol): both sides compute in fp32 and differ in summation order and
# in the final rounding to the storage dtype; fp16 has 11 significant bits, bf16 8.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
}
DTYPES = list(TOLERANCES)


def run_rms_norm(x, normalized_shape, weight, backend, upstream, eps=None):
    """Forward and backward of normlib.rms_norm; returns (y, dx, dw) with None for absent."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight)]
    y = normlib.rms_norm(leaves[0], normalized_shape, leaves[1], eps, backend=backend)
    y.backward(upstream)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def run_add_rms_norm(x, residual, normalized_shape, weight, backend, upstream, upstream_h):
    """Forward and backward of add_rms_norm, with gradients flowing into both outputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, residual, weight)]
    y, h = normlib.add_rms_norm(*leaves[:2], normalized_shape, leaves[2], None, backend=backend)
    torch.autograd.backward((y, h), (upstream, upstream_h))
    return [y.detach(), h.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_all_close(actual, expected, dtype):
    for name, a, e in zip(("out", "grad 1", "grad 2", "grad 3", "grad 4"), actual, expected):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


def make(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def compare(shape, normalized_shape, dtype, *, weight=True, x=None, eps=None):
    x = make(shape, dtype, 1) if x is None else x
    w = make(normalized_shape, dtype, 2) if weight else None
    upstream = make(x.shape, dtype, 4)
    actual = run_rms_norm(x, normalized_shape, w, "triton", upstream, eps)
    expected = run_rms_norm(x, normalized_shape, w, "torch", upstream, eps)
    assert_all_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 3, 37, 130])
def test_forward_backward_matches_torch(width, dtype):
    compare((7, width), (width,), dtype)  # 7 rows: not a multiple of the backward's program count


def test_without_weight_and_with_explicit_eps():
    compare((5, 37), (37,), torch.float32, weight=False, eps=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eps_none_means_float32_machine_epsilon(dtype):
    # A row whose mean square is comparable to eps shows which eps was used; like torch, None means
    # float32's epsilon for every float dtype but float64 (bfloat16's own is 6e4 times larger).
    x = torch.zeros(1, 4, dtype=dtype)
    x[0, 0] = 1e-3
    expected = torch.nn.functional.rms_norm(x, (4,), None, None)
    torch.testing.assert_close(normlib.rms_norm(x, (4,), None, None, backend="triton"), expected)
    # The kernel's own fallback, for callers that pass eps=None straight through.
    torch.testing.assert_close(kernels.rms_norm_triton(x, (4,), None, None), expected)


def test_leading_dims_and_several_normalized_dims():
    compare((2, 3, 4, 5), (4, 5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_path_for_rows_wider_than_a_block(monkeypatch, dtype):
    monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 32)  # 8 fp32 or 16 half elements per block
    _block, single_block, _ = _rows.block_config(37, torch.tensor([], dtype=dtype).element_size())
    assert not single_block
    compare((7, 37), (37,), dtype)


def test_non_contiguous_input():
    x = make((6, 80), torch.float32)[:, ::2]  # (6, 40), column stride 2
    compare(x.shape, (40,), torch.float32, x=x)
    rows_slice = make((6, 50), torch.float32)[:, :37]  # row stride 50
    compare(rows_slice.shape, (37,), torch.float32, x=rows_slice)


def test_large_offset():
    x = 1e4 + make((5, 37), torch.float32)
    y = normlib.rms_norm(x, (37,), None, 1e-5, backend="triton")
    exact = torch.nn.functional.rms_norm(x.double(), (37,), None, 1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("looped", [False, True])
def test_add_rms_norm_gradients_reach_input_and_residual(monkeypatch, dtype, looped):
    if looped:
        monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 32)
    x, residual, w = make((7, 37), dtype, 1), make((7, 37), dtype, 2), make((37,), dtype, 3)
    upstream, upstream_h = make((7, 37), dtype, 5), make((7, 37), dtype, 6)
    actual = run_add_rms_norm(x, residual, (37,), w, "triton", upstream, upstream_h)
    expected = run_add_rms_norm(x, residual, (37,), w, "torch", upstream, upstream_h)
    assert_all_close(actual, expected, dtype)


def test_weight_gradient_is_bit_identical_across_runs():
    x, w, upstream = make((9, 37), torch.float32, 1), make((37,), torch.float32, 2), make((9, 37), torch.float32, 4)
    first = run_rms_norm(x, (37,), w, "triton", upstream)
    second = run_rms_norm(x, (37,), w, "triton", upstream)
    assert torch.equal(first[2], second[2])


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        normlib.rms_norm(torch.randn(2, 8), (8,), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        normlib.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), (8,), backend="triton")


def test_custom_op_registration_passes_opcheck():
    # The fake implementation and autograd registration torch.compile relies on, without compiling.
    x, residual = make((3, 16), torch.float32, 1).requires_grad_(), make((3, 16), torch.float32, 2)
    w = make((16,), torch.float32, 3).requires_grad_()
    torch.library.opcheck(kernels._rms_norm_fwd_op, (x, residual.requires_grad_(), w, 16, 1e-6))


def test_runs_inside_torch_compile_without_graph_breaks():
    # fullgraph=True fails on any graph break; "aot_eager" traces forward and backward through the
    # fake implementations and the autograd registration without Inductor's slow CPU compile.
    def block(x, residual, w):
        y, h = kernels.add_rms_norm_triton(x, residual, (37,), w, None)
        return (y.sin() + h).sum()

    inputs = [make(s, torch.float32, i).requires_grad_() for i, s in enumerate([(5, 37), (5, 37), (37,)])]
    eager_grads = torch.autograd.grad(block(*inputs), inputs)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for eager, traced in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
