"""Dynamic Tanh: the NumPy reference, the functional op on every backend, the module, the errors,
and the fused Triton kernels (under Triton's interpreter on the CPU, as tests/conftest.py sets up)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import normlib
from normlib.dyt import DyT, dyt, dyt_reference, dyt_reference_backward

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_kernels_unavailable() -> str | None:
    """Why the DyT kernels cannot run on this machine's kernel device, or None."""
    if not HAS_TRITON:
        return "triton is not installed"
    from kernel_devices import kernel_device

    device = kernel_device()
    if "triton" not in normlib.available_backends("dyt", device):
        return f"the triton backend does not run on {device.type} here: {normlib.backends.triton_device_reason(device)}"
    return None


_WHY_NO_KERNELS = _triton_kernels_unavailable()
needs_triton = pytest.mark.skipif(_WHY_NO_KERNELS is not None, reason=str(_WHY_NO_KERNELS))

# Per-dtype tolerances (rtol, atol) of a backend against the float64 result: the kernels compute in
# fp32 and round the result to the storage dtype (fp16 has 11 significant bits, bf16 8).
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),
}
DTYPES = list(TOLERANCES)


def make(shape, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def run(x, alpha, weight, bias, backend, upstream):
    """Forward and backward of normlib.dyt; returns [y, dx, dalpha, dweight, dbias] (None if absent)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, alpha, weight, bias)]
    y = dyt(*leaves, backend=backend)
    y.backward(upstream)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_all_close(actual, expected, dtype):
    for name, a, e in zip(("y", "dx", "dalpha", "dweight", "dbias"), actual, expected):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
        # alpha's gradient sums every element: its tolerance grows with their number
        scale = (actual[0].numel() ** 0.5) if name == "dalpha" else 1.0
        tol = {key: value * scale for key, value in TOLERANCES[dtype].items()}
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------


def test_reference_against_a_hand_computation():
    x = np.array([[0.0, 1.0, -2.0]])
    y, cache = dyt_reference(x, 0.5, weight=np.array([1.0, 2.0, 3.0]), bias=np.array([0.1, 0.0, -0.1]))
    expected = np.array([[0.1, 2 * np.tanh(0.5), -3 * np.tanh(1.0) - 0.1]])
    np.testing.assert_allclose(y, expected, rtol=1e-15)
    dx, dalpha, dweight, dbias = dyt_reference_backward(np.ones_like(x), cache, 0.5, np.array([1.0, 2.0, 3.0]))
    slope = 1 - np.tanh(0.5 * x) ** 2
    np.testing.assert_allclose(dx, np.array([[1.0, 2.0, 3.0]]) * 0.5 * slope, rtol=1e-15)
    np.testing.assert_allclose(dalpha, (np.array([1.0, 2.0, 3.0]) * x * slope).sum(), rtol=1e-15)
    np.testing.assert_allclose(dweight, np.tanh(0.5 * x)[0], rtol=1e-15)
    np.testing.assert_allclose(dbias, np.ones(3))


@pytest.mark.parametrize("param_shape", [(6,), (5, 6), None])
def test_reference_backward_matches_autograd_in_float64(param_shape):
    x = make((4, 5, 6), torch.float64, 1)
    weight = make(param_shape, torch.float64, 2) if param_shape else None
    bias = make(param_shape, torch.float64, 3) if param_shape else None
    upstream = make(x.shape, torch.float64, 4)
    numpy = lambda t: None if t is None else t.numpy()  # noqa: E731
    y, cache = dyt_reference(x.numpy(), 0.8, numpy(weight), numpy(bias))
    dx, dalpha, dweight, dbias = dyt_reference_backward(upstream.numpy(), cache, 0.8, numpy(weight))
    alpha = torch.tensor(0.8, dtype=torch.float64)
    got = run(x, alpha, weight, bias, "torch", upstream)
    np.testing.assert_allclose(got[0].numpy(), y, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got[1].numpy(), dx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got[2].item(), dalpha, rtol=1e-12)
    if param_shape:
        np.testing.assert_allclose(got[3].numpy(), dweight, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[4].numpy(), dbias, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# The functional op
# ----------------------------------------------------------------------------------------------


def test_gradcheck_float64_through_every_input():
    inputs = [make(s, torch.float64, i).requires_grad_() for i, s in enumerate([(3, 4, 5), (1,), (5,), (5,)])]
    assert torch.autograd.gradcheck(lambda *a: dyt(*a, backend="torch"), inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_float64_per_dtype(dtype):
    x, alpha, w, b = make((6, 37), dtype, 1, 2.0), torch.tensor([0.7], dtype=dtype), make((37,), dtype, 2), make((37,), dtype, 3)
    upstream = make(x.shape, dtype, 4)
    actual = run(x, alpha, w, b, "torch", upstream)
    expected = run(*(t.double() for t in (x, alpha, w, b)), "torch", upstream.double())
    assert_all_close(actual, [None if e is None else e.to(dtype) for e in expected], dtype)


def test_alpha_as_a_float_and_as_a_zero_dim_tensor_agree():
    x = make((3, 8))
    torch.testing.assert_close(dyt(x, 0.5), dyt(x, torch.tensor(0.5)))
    torch.testing.assert_close(dyt(x, 0.5), torch.tanh(0.5 * x))


def test_auto_on_the_cpu_is_the_torch_backend():
    x, w = make((4, 8)), make((8,), seed=1)
    assert torch.equal(dyt(x, 0.5, w, w), dyt(x, 0.5, w, w, backend="torch"))


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.ones(2, 4, dtype=torch.int64), 0.5), TypeError, "input must be a floating-point tensor"),
        (("not a tensor", 0.5), TypeError, "input must be a torch.Tensor"),
        ((torch.ones(2, 4), torch.ones(2)), ValueError, r"alpha must be a scalar: a tensor of shape \(\) or \(1,\), got shape \(2,\)"),
        ((torch.ones(2, 4), torch.ones(1, 1)), ValueError, "alpha must be a scalar"),
        ((torch.ones(2, 4), "0.5"), TypeError, "alpha must be a torch.Tensor with one element or a float"),
        ((torch.ones(2, 4), torch.ones(1, dtype=torch.int32)), TypeError, "alpha must be a floating-point tensor"),
        ((torch.ones(2, 4), 0.5, torch.ones(3)), ValueError, r"weight must have the shape of the last dimension\(s\) of input \(2, 4\), e.g. \(4,\), got \(3,\)"),
        ((torch.ones(2, 4), 0.5, None, torch.ones(5)), ValueError, "bias must have the shape of the last dimension"),
        ((torch.ones(2, 4), 0.5, torch.ones(4, dtype=torch.int64)), TypeError, "weight must be a floating-point tensor"),
        ((torch.ones(2, 4), 0.5, [1.0] * 4), TypeError, "weight must be a torch.Tensor or None"),
        ((torch.ones(2, 4), 0.5, torch.ones(4), torch.ones(2, 4)), ValueError, "weight and bias must have the same shape"),
        ((torch.ones(2, 4), 0.5, torch.ones(3, 2, 4)), ValueError, "weight must have the shape of the last"),
    ],
)
def test_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        dyt(*args)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend='tpu' is not a known backend"):
        dyt(torch.ones(2, 4), 0.5, backend="tpu")
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run dyt here"):
        dyt(torch.ones(2, 4), 0.5, backend="cpu")


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


def test_module_parameters_initialization_and_state_dict_keys():
    module = DyT(16)
    assert module.alpha.shape == (1,) and module.alpha.item() == 0.5
    assert torch.equal(module.weight, torch.ones(16)) and torch.equal(module.bias, torch.zeros(16))
    assert list(module.state_dict()) == ["alpha", "weight", "bias"]
    assert repr(module) == "DyT((16,), alpha_init=0.5, elementwise_affine=True)"
    assert DyT(16, alpha_init=2.0).alpha.item() == 2.0
    no_bias = DyT((4, 16), bias=False)
    assert no_bias.bias is None and no_bias.weight.shape == (4, 16)
    bare = DyT(16, elementwise_affine=False)
    assert bare.weight is None and bare.bias is None and list(bare.state_dict()) == ["alpha"]


def test_module_is_a_drop_in_for_layer_norm_and_every_parameter_learns():
    x = make((2, 3, 16), seed=1, scale=3.0)
    module = DyT(16, alpha_init=0.3)
    with torch.no_grad():
        module.weight.copy_(make((16,), seed=2))
        module.bias.copy_(make((16,), seed=3))
    y = module(x)
    torch.testing.assert_close(y, module.weight * torch.tanh(0.3 * x) + module.bias)
    y.square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_module_factory_kwargs_and_bad_arguments():
    assert DyT(8, dtype=torch.float64).alpha.dtype == torch.float64
    with pytest.raises(ValueError, match="alpha_init must be a finite number"):
        DyT(8, alpha_init=float("nan"))
    with pytest.raises(ValueError, match="normalized_shape must be positive sizes"):
        DyT(0)
    with pytest.raises(ValueError, match="backend='gpu' is not a known backend"):
        DyT(8, backend="gpu")


def test_dyt_saturates_where_layer_norm_rescales():
    # The difference the chapter is about: LayerNorm undoes a scaling of its input, DyT does not --
    # it saturates, bounding every output by |gamma| + |beta|.
    x = make((4, 32), seed=5)
    module, layer_norm = DyT(32), normlib.LayerNorm(32)
    torch.testing.assert_close(layer_norm(100 * x), layer_norm(x), rtol=1e-4, atol=1e-4)
    big = module(100 * x)
    assert big.abs().max() <= 1.0
    assert (big - module(x)).abs().max() > 0.5


# ----------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on the CPU)
# ----------------------------------------------------------------------------------------------


def compare_kernel(shape, dtype, param_shape=None, *, weight=True, bias=True, x=None, alpha=0.7):
    x = make(shape, dtype, 1, 2.0) if x is None else x
    param_shape = param_shape or (x.shape[-1],)
    w = make(param_shape, dtype, 2) if weight else None
    b = make(param_shape, dtype, 3) if bias else None
    a = torch.tensor([alpha], dtype=dtype)
    upstream = make(x.shape, dtype, 4)
    actual = run(x, a, w, b, "triton", upstream)
    expected = run(x, a, w, b, "torch", upstream)
    assert_all_close(actual, expected, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 3, 37, 130])
def test_kernel_matches_torch(width, dtype):
    compare_kernel((7, width), dtype)  # 7 rows: not a multiple of the backward's program count


@needs_triton
@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_kernel_without_weight_or_bias(weight, bias):
    compare_kernel((5, 37), torch.float32, weight=weight, bias=bias)


@needs_triton
def test_kernel_with_several_parameter_dims_and_large_inputs_of_tanh():
    compare_kernel((2, 3, 4, 5), torch.float32, (4, 5))
    compare_kernel((3, 9), torch.float32, alpha=50.0)  # saturated: tanh = +-1, slope 0, no overflow


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_looped_path_for_rows_wider_than_a_block(monkeypatch, dtype):
    from normlib.kernels import _rows

    monkeypatch.setattr(_rows, "MAX_BLOCK_BYTES", 32)  # 8 fp32 or 16 half elements per block
    _block, single_block, _ = _rows.block_config(37, torch.tensor([], dtype=dtype).element_size())
    assert not single_block
    compare_kernel((7, 37), dtype)


@needs_triton
def test_kernel_non_contiguous_input():
    compare_kernel(None, torch.float32, x=make((6, 80), seed=1)[:, ::2])  # column stride 2
    compare_kernel(None, torch.float32, x=make((6, 50), seed=1)[:, :37])  # row stride 50


@needs_triton
def test_kernel_empty_input_gives_zero_parameter_gradients():
    got = run(torch.empty(0, 8), torch.tensor([0.5]), torch.ones(8), torch.zeros(8), "triton", torch.empty(0, 8))
    assert got[0].shape == (0, 8) and got[1].shape == (0, 8)
    assert torch.equal(got[2], torch.zeros(1)) and torch.equal(got[3], torch.zeros(8)) and torch.equal(got[4], torch.zeros(8))


@needs_triton
def test_kernel_parameter_gradients_are_bit_identical_across_runs():
    x, a, w, b, upstream = make((9, 37), seed=1), torch.tensor([0.7]), make((37,), seed=2), make((37,), seed=3), make((9, 37), seed=4)
    first = run(x, a, w, b, "triton", upstream)
    second = run(x, a, w, b, "triton", upstream)
    for one, two in zip(first[2:], second[2:]):
        assert torch.equal(one, two)


@needs_triton
def test_kernel_module_on_the_triton_backend():
    module = DyT(16, backend="triton")
    x = make((3, 16), seed=1).requires_grad_()
    module(x).sum().backward()
    reference = DyT(16, backend="torch")
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(module.alpha.grad, reference.alpha.grad)


@needs_triton
def test_kernel_on_a_cpu_tensor_without_the_interpreter_is_a_clear_error(monkeypatch):
    from kernel_devices import pretend_kernels_compiled_for_the_gpu

    pretend_kernels_compiled_for_the_gpu(monkeypatch)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dyt(torch.randn(2, 8), 0.5, backend="triton")


@needs_triton
def test_kernel_custom_op_registration_passes_opcheck():
    from normlib.kernels import dyt as kernels

    x, a, w, b = (make(s, seed=i).requires_grad_() for i, s in enumerate([(3, 16), (1,), (16,), (16,)]))
    torch.library.opcheck(kernels._dyt_fwd_op, (x, a, w, b))
