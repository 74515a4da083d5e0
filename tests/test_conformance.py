"""The fused implementations against the "torch" backend: one harness for op x backend x dtype x
layout x device.

Each fused backend (``"triton"``, ``"cpu"``) runs an op forward and backward on a layout of the
input, and its outputs and gradients are compared with those of ``backend="torch"`` on the same
device, with one tolerance table. The Triton kernels run compiled on a CUDA device where one
exists, and under Triton's interpreter on CPU tensors otherwise (``tests/kernel_devices.py``;
``tests/conftest.py`` chose before triton was imported). The interpreter executes every program
in Python, so sizes stay tiny, and the looped path for wide rows is reached by lowering the block
limit, not by a huge width.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

import normlib
from kernel_devices import INTERPRET, configure_triton, kernel_device, pretend_kernels_compiled_for_the_gpu

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Per-dtype tolerances (rtol, atol) for outputs and gradients: both sides compute in fp32 and
# differ in summation order and in the final rounding to the storage dtype; fp16 has 11
# significant bits, bf16 8.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
}
DTYPES = list(TOLERANCES)
OPS = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
FUSED_BACKENDS = ["triton", "cpu"]
EPS = {"layer_norm": 1e-5, "add_layer_norm": 1e-5, "rms_norm": None, "add_rms_norm": None}
HAS_BIAS = {"layer_norm": True, "add_layer_norm": True, "rms_norm": False, "add_rms_norm": False}


def device_for(backend: str) -> torch.device:
    """Where a backend's cases run: Triton on the kernels' device, everything else on the CPU."""
    return kernel_device() if backend == "triton" else torch.device("cpu")


def require(op: str, backend: str) -> torch.device:
    """The device for (op, backend), or skip the test saying why the pair cannot run here."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    device = device_for(backend)
    if backend not in normlib.available_backends(op, device):
        pytest.skip(f"backend {backend!r} does not run {op} on {device.type} here")
    return device


def make(shape, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype).to(device)


def run_op(op: str, x, residual, normalized_shape, weight, bias, backend, upstream, upstream_h, eps="default"):
    """Forward and backward of ``op``; returns the outputs (y, and h for the add_* ops) and the
    gradients of x (and residual), weight (and bias, for the ops that have one), None where absent."""
    eps = EPS[op] if eps == "default" else eps
    inputs = [x, residual] if op.startswith("add_") else [x]
    params = [weight, bias] if HAS_BIAS[op] else [weight]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs + params]
    fn: Callable = getattr(normlib, op)
    out = fn(*leaves[: len(inputs)], normalized_shape, *leaves[len(inputs):], eps, backend=backend)
    outputs = list(out) if isinstance(out, tuple) else [out]
    upstreams = [upstream, upstream_h][: len(outputs)]
    used = [(o, g) for o, g in zip(outputs, upstreams) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [o.detach() for o in outputs] + [t.grad if t is not None else None for t in leaves]


def assert_all_close(actual, expected, dtype):
    for index, (a, e) in enumerate(zip(actual, expected)):
        name = f"result {index}"
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


def compare(op, backend, shape, normalized_shape, dtype, *, weight=True, bias=True, x=None, eps="default",
            h_used=True):
    """``op`` with ``backend`` against ``backend="torch"`` on the same device and inputs."""
    device = require(op, backend)
    x = make(shape, dtype, 1, device) if x is None else x.to(device)
    residual = make(x.shape, dtype, 2, device) if op.startswith("add_") else None
    w = make(normalized_shape, dtype, 3, device) if weight else None
    b = make(normalized_shape, dtype, 4, device) if bias and HAS_BIAS[op] else None
    upstream = make(x.shape, dtype, 5, device)
    upstream_h = make(x.shape, dtype, 6, device) if op.startswith("add_") and h_used else None
    actual = run_op(op, x, residual, normalized_shape, w, b, backend, upstream, upstream_h, eps)
    expected = run_op(op, x, residual, normalized_shape, w, b, "torch", upstream, upstream_h, eps)
    assert_all_close(actual, expected, dtype)


@pytest.fixture
def looped(monkeypatch) -> Callable[[torch.dtype, int], None]:
    """Lower the Triton kernels' block limit so that rows of ``width`` take the looped path."""

    def lower(dtype: torch.dtype, width: int, block_bytes: int = 32) -> None:
        from normlib.kernels import _rows

        monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", block_bytes)  # 8 fp32 or 16 half elements
        block, single_block, _ = _rows.block_config(width, torch.tensor([], dtype=dtype).element_size())
        assert not single_block and block < width

    return lower


# ------------------------------------------------------------------------------------------------
# Where the kernels run
# ------------------------------------------------------------------------------------------------


def test_device_selection_prefers_cuda_and_interprets_only_without_it():
    assert kernel_device(cuda_available=True) == torch.device("cuda")
    assert kernel_device(cuda_available=False) == torch.device("cpu")
    without_gpu: dict[str, str] = {}
    assert configure_triton(without_gpu, cuda_available=False) is True
    assert without_gpu == {INTERPRET: "1"}
    with_gpu: dict[str, str] = {}
    assert configure_triton(with_gpu, cuda_available=True) is False
    assert with_gpu == {}  # compiled kernels: the variable stays unset
    explicit = {INTERPRET: "0"}
    assert configure_triton(explicit, cuda_available=False) is False and explicit == {INTERPRET: "0"}
    assert device_for("cpu") == torch.device("cpu") and device_for("torch") == torch.device("cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_device_selection_of_this_session_matches_how_the_kernels_were_built():
    # conftest chose before triton was imported: interpreted kernels exactly where no CUDA exists.
    from triton.runtime.interpreter import InterpretedFunction

    from normlib.kernels import _rows

    interpreted = isinstance(_rows._sum_partials_kernel, InterpretedFunction)
    assert interpreted == (os.environ.get(INTERPRET, "0") == "1")
    if INTERPRET not in os.environ or os.environ[INTERPRET] == "1":
        assert interpreted == (not torch.cuda.is_available())
    assert device_for("triton") == kernel_device()


# ------------------------------------------------------------------------------------------------
# op x backend x dtype x layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 3, 37, 130])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_forward_backward_matches_torch(op, backend, width, dtype):
    compare(op, backend, (7, width), (width,), dtype)  # 7 rows: not a multiple of the backward's programs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_looped_path_for_rows_wider_than_a_block(looped, op, dtype):
    require(op, "triton")
    looped(dtype, 37)
    compare(op, "triton", (7, 37), (37,), dtype)


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_optional_weight_and_bias(op, backend, weight, bias):
    if not HAS_BIAS[op] and bias:
        pytest.skip(f"{op} has no bias")
    compare(op, backend, (5, 37), (37,), torch.float32, weight=weight, bias=bias)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_leading_dims_and_several_normalized_dims(op, backend):
    compare(op, backend, (2, 3, 4, 5), (4, 5), torch.float32)  # rows of 20 = 4 * 5 elements, 6 rows


LAYOUTS = {
    "column stride 2": lambda: make((6, 80), torch.float32)[:, ::2],  # (6, 40)
    "row slice": lambda: make((6, 50), torch.float32)[:, :37],  # row stride 50: a view, no copy needed
    "transposed": lambda: make((37, 6), torch.float32).t(),  # (6, 37), column stride 6
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_input(op, backend, layout):
    x = LAYOUTS[layout]()
    assert not x.is_contiguous() or layout == "row slice"
    compare(op, backend, x.shape, (x.shape[-1],), torch.float32, x=x)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_without_weight_and_with_explicit_eps(op, backend):
    compare(op, backend, (5, 37), (37,), torch.float32, weight=False, eps=1e-3)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_h_unused_downstream(op, backend):
    # Only y receives a gradient: the kernels' HAS_DH=False path.
    compare(op, backend, (4, 20), (20,), torch.float32, weight=False, bias=False, h_used=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_rms_norm_eps_none_means_float32_machine_epsilon(backend, dtype):
    # A row whose mean square is comparable to eps shows which eps was used; like torch, None means
    # float32's epsilon for every float dtype but float64 (bfloat16's own is 6e4 times larger).
    device = require("rms_norm", backend)
    x = torch.zeros(1, 4, dtype=dtype, device=device)
    x[0, 0] = 1e-3
    expected = torch.nn.functional.rms_norm(x, (4,), None, None)
    torch.testing.assert_close(normlib.rms_norm(x, (4,), None, None, backend=backend), expected)


@pytest.mark.parametrize("looped_path", [False, True])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_large_offset_keeps_the_spread(looped, op, backend, looped_path):
    # 1e4 + N(0, 1) in fp32: summing raw values loses the digits that carry the spread. Compared
    # with a float64 computation on the same fp32 inputs (not with torch, whose error is larger).
    device = require(op, backend)
    if looped_path:
        if backend != "triton":
            pytest.skip("the looped path is the Triton kernels'")
        looped(torch.float32, 37, block_bytes=64)
    x = 1e4 + make((5, 37), torch.float32, device=device)
    y = getattr(normlib, op)(x, (37,), None, *([None] if op == "layer_norm" else []), 1e-5, backend=backend)
    exact = getattr(torch.nn.functional, op)(x.double(), (37,), None, *([None] if op == "layer_norm" else []), 1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("looped_path", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_residual_gradients_reach_input_and_residual(looped, op, backend, dtype, looped_path):
    if looped_path:
        if backend != "triton":
            pytest.skip("the looped path is the Triton kernels'")
        require(op, backend)
        looped(dtype, 37)
    compare(op, backend, (7, 37), (37,), dtype)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_parameter_gradients_are_bit_identical_across_runs(op, backend):
    device = require(op, backend)
    x, residual = make((9, 37), torch.float32, 1, device), make((9, 37), torch.float32, 2, device)
    w, b = make((37,), torch.float32, 3, device), make((37,), torch.float32, 4, device)
    upstream = make((9, 37), torch.float32, 5, device)
    b = b if HAS_BIAS[op] else None
    runs = [run_op(op, x, residual if op.startswith("add_") else None, (37,), w, b, backend, upstream, None)
            for _ in range(2)]
    first, second = (run[-2:] if HAS_BIAS[op] else run[-1:] for run in runs)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_empty_batch_gives_zero_parameter_gradients(op, backend):
    device = require(op, backend)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    out = run_op(op, torch.empty(0, 8, device=device), None, (8,), w, b if HAS_BIAS[op] else None, backend,
                 torch.empty(0, 8, device=device), None)
    assert out[0].shape == (0, 8)
    assert torch.equal(out[2], torch.zeros(8, device=device))
    if HAS_BIAS[op]:
        assert torch.equal(out[3], torch.zeros(8, device=device))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_rms_norm_of_an_empty_row_with_eps_zero(backend):
    # No elements to average and no eps: torch gives an empty result, not a division error.
    device = require("rms_norm", backend)
    for shape in [(3, 0), (0, 4)]:
        x = torch.empty(shape, dtype=torch.float64 if backend == "cpu" else torch.float32, device=device)
        y = normlib.rms_norm(x, shape[-1:], None, 0.0, backend=backend)
        assert y.shape == shape and y.dtype == x.dtype


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch, op):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    pretend_kernels_compiled_for_the_gpu(monkeypatch)
    x = torch.randn(2, 8)
    args = [x, torch.randn(2, 8), (8,)] if op.startswith("add_") else [x, (8,)]
    with pytest.raises(RuntimeError, match=INTERPRET):
        getattr(normlib, op)(*args, backend="triton")


# ------------------------------------------------------------------------------------------------
# The Triton ops inside torch.compile
# ------------------------------------------------------------------------------------------------


def _kernels(op: str):
    require(op, "triton")
    from normlib.kernels import layer_norm, rms_norm

    return layer_norm if "layer_norm" in op else rms_norm


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_custom_op_registration_passes_opcheck(op):
    # Checks the fake (shape-only) implementation and the autograd registration that torch.compile
    # relies on, without compiling (Inductor on the CPU would take tens of seconds).
    kernels, device = _kernels(op), kernel_device()
    x, residual = make((3, 16), torch.float32, 1, device).requires_grad_(), make((3, 16), torch.float32, 2, device)
    w = make((16,), torch.float32, 3, device).requires_grad_()
    if op == "layer_norm":
        torch.library.opcheck(kernels._layer_norm_fwd_op, (x, residual.requires_grad_(), w, None, 16, 1e-5))
    else:
        torch.library.opcheck(kernels._rms_norm_fwd_op, (x, residual.requires_grad_(), w, 16, 1e-6))


@pytest.mark.parametrize("through", ["kernel entry", "public op"])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_runs_inside_torch_compile_without_graph_breaks(op, through):
    # fullgraph=True fails on any graph break; "aot_eager" traces forward and backward through the
    # fake implementations and the autograd registration without Inductor's slow CPU compile.
    # Through the public op, the argument checks and normlib.backends' dispatch are traced too.
    kernels, device = _kernels(op), kernel_device()
    if through == "kernel entry":
        entry: Callable = getattr(kernels, f"{op}_triton")
        fused = lambda x, r, shape, *params: entry(x, r, shape, *params, 1e-5 if op == "add_layer_norm" else 1e-6)  # noqa: E731
    else:
        fused = lambda x, r, shape, *params: getattr(normlib, op)(x, r, shape, *params, backend="triton")  # noqa: E731
    extra = [(37,)] if op == "add_layer_norm" else []

    def block(x, residual, w, *bias):
        y, h = fused(x, residual, (37,), w, *bias)
        return (y.sin() + h).sum()

    shapes = [(5, 37), (5, 37), (37,)] + extra
    inputs = [make(s, torch.float32, i, device).requires_grad_() for i, s in enumerate(shapes)]
    eager_grads = torch.autograd.grad(block(*inputs), inputs)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for eager, traced in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
