"""The fused Triton LayerNorm kernels against the "torch" backend.

Run on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported), which executes every program in Python: sizes stay tiny. The looped path for
wide rows is reached by lowering the block limit, not by a huge width.
"""

from __future__ import annotations

import pytest
import torch

import normlib

pytest.importorskip("triton")

from normlib.kernels import _rows  # noqa: E402  (after the importorskip)
from normlib.kernels import layer_norm as kernels  # noqa: E402

# Per-dtype tolerances (rtol, atol): both sides compute in fp32 and differ in summation order and
# in the final rounding to the storage dtype; fp16 has 11 significant bits, bf16 8.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
}
DTYPES = list(TOLERANCES)


def run_layer_norm(x, normalized_shape, weight, bias, backend, upstream):
    """Forward and backward of normlib.layer_norm; returns (y, dx, dw, db) with None for absent."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = normlib.layer_norm(leaves[0], normalized_shape, leaves[1], leaves[2], 1e-5, backend=backend)
    y.backward(upstream)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def run_add_layer_norm(x, residual, normalized_shape, weight, bias, backend, upstream, upstream_h):
    """Forward and backward of add_layer_norm, with gradients flowing into both outputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    y, h = normlib.add_layer_norm(*leaves[:2], normalized_shape, *leaves[2:], 1e-5, backend=backend)
    torch.autograd.backward((y, h), (upstream, upstream_h))
    return [y.detach(), h.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_all_close(actual, expected, dtype):
    for name, a, e in zip(("out", "grad 1", "grad 2", "grad 3", "grad 4", "grad 5"), actual, expected):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


def make(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def compare(shape, normalized_shape, dtype, *, weight=True, bias=True, x=None):
    x = make(shape, dtype, 1) if x is None else x
    w = make(normalized_shape, dtype, 2) if weight else None
    b = make(normalized_shape, dtype, 3) if bias else None
    upstream = make(x.shape, dtype, 4)
    actual = run_layer_norm(x, normalized_shape, w, b, "triton", upstream)
    expected = run_layer_norm(x, normalized_shape, w, b, "torch", upstream)
    assert_all_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 3, 37, 130])
def test_forward_backward_matches_torch(width, dtype):
    compare((7, width), (width,), dtype)  # 7 rows: not a multiple of the backward's program count


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_optional_weight_and_bias(weight, bias):
    compare((5, 37), (37,), torch.float32, weight=weight, bias=bias)


def test_leading_dims_and_several_normalized_dims():
    compare((2, 3, 4, 5), (4, 5), torch.float32)  # rows of 20 = 4 * 5 elements, 6 rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_looped_path_for_rows_wider_than_a_block(monkeypatch, dtype):
    monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 32)  # 8 fp32 or 16 half elements per block
    block, single_block, _ = _rows.block_config(37, torch.tensor([], dtype=dtype).element_size())
    assert not single_block and block < 37
    compare((7, 37), (37,), dtype)


def test_non_contiguous_input():
    x = make((6, 80), torch.float32)[:, ::2]  # (6, 40), column stride 2
    assert not x.is_contiguous()
    compare(x.shape, (40,), torch.float32, x=x)
    rows_slice = make((6, 50), torch.float32)[:, :37]  # row stride 50: a view, no copy needed
    compare(rows_slice.shape, (37,), torch.float32, x=rows_slice)
    transposed = make((37, 6), torch.float32).t()  # (6, 37), column stride 6
    compare(transposed.shape, (37,), torch.float32, x=transposed)


@pytest.mark.parametrize("looped", [False, True])
def test_large_offset_keeps_variance(monkeypatch, looped):
    # 1e4 + N(0, 1) in fp32: summing raw values loses the digits that carry the spread. Compared
    # with a float64 computation on the same fp32 inputs (not with torch, whose error is larger).
    if looped:
        monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 64)
    x = 1e4 + make((5, 37), torch.float32)
    y = normlib.layer_norm(x, (37,), None, None, 1e-5, backend="triton")
    exact = torch.nn.functional.layer_norm(x.double(), (37,), None, None, 1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("looped", [False, True])
def test_add_layer_norm_gradients_reach_input_and_residual(monkeypatch, dtype, looped):
    if looped:
        monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 32)
    x, residual = make((7, 37), dtype, 1), make((7, 37), dtype, 2)
    w, b = make((37,), dtype, 3), make((37,), dtype, 4)
    upstream, upstream_h = make((7, 37), dtype, 5), make((7, 37), dtype, 6)
    actual = run_add_layer_norm(x, residual, (37,), w, b, "triton", upstream, upstream_h)
    expected = run_add_layer_norm(x, residual, (37,), w, b, "torch", upstream, upstream_h)
    assert_all_close(actual, expected, dtype)


def test_add_layer_norm_without_weight_and_h_unused():
    x, residual = make((4, 20), torch.float32, 1), make((4, 20), torch.float32, 2)
    grads = []
    for backend in ("triton", "torch"):
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y, _h = normlib.add_layer_norm(xi, ri, (20,), None, None, 1e-5, backend=backend)
        (y * make(y.shape, torch.float32, 3)).sum().backward()
        grads.append((xi.grad, ri.grad))
    for actual, expected in zip(grads[0], grads[1]):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])


def test_weight_and_bias_gradients_are_bit_identical_across_runs():
    x, w, b = make((9, 37), torch.float32, 1), make((37,), torch.float32, 2), make((37,), torch.float32, 3)
    upstream = make((9, 37), torch.float32, 4)
    first = run_layer_norm(x, (37,), w, b, "triton", upstream)
    second = run_layer_norm(x, (37,), w, b, "triton", upstream)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_empty_batch_gives_zero_parameter_gradients():
    out = run_layer_norm(torch.empty(0, 8), (8,), torch.ones(8), torch.zeros(8), "triton", torch.empty(0, 8))
    assert out[0].shape == (0, 8)
    assert torch.equal(out[2], torch.zeros(8)) and torch.equal(out[3], torch.zeros(8))


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        normlib.layer_norm(torch.randn(2, 8), (8,), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        normlib.add_layer_norm(torch.randn(2, 8), torch.randn(2, 8), (8,), backend="triton")


def test_custom_op_registration_passes_opcheck():
    # Checks the fake (shape-only) implementation and the autograd registration that torch.compile
    # relies on, without compiling (Inductor on the CPU would take tens of seconds).
    x, residual = make((3, 16), torch.float32, 1).requires_grad_(), make((3, 16), torch.float32, 2)
    w = make((16,), torch.float32, 3).requires_grad_()
    torch.library.opcheck(kernels._layer_norm_fwd_op, (x, residual.requires_grad_(), w, None, 16, 1e-5))


def test_runs_inside_torch_compile_without_graph_breaks():
    # fullgraph=True fails on any graph break; "aot_eager" traces forward and backward through the
    # fake implementations and the autograd registration without Inductor's slow CPU compile.
    def block(x, residual, w, b):
        y, h = kernels.add_layer_norm_triton(x, residual, (37,), w, b, 1e-5)
        return (y.sin() + h).sum()

    inputs = [make(s, torch.float32, i).requires_grad_() for i, s in enumerate([(5, 37), (5, 37), (37,), (37,)])]
    eager_grads = torch.autograd.grad(block(*inputs), inputs)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for eager, traced in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
