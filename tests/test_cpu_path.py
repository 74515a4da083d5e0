"""normlib's fused CPU path (normlib/cpu/) against the "torch" backend and the float64 reference.

Both implementations inside the path are tested: the C kernels (float32, bfloat16, float16) and
the blocked PyTorch fallback (float64 always, and every dtype when the C kernels are switched
off). Cases: widths 1, 3, 1000, 4099; 1 and 7 rows; leading and multi-dim normalized shapes;
non-contiguous inputs; rows offset by 1e4; weight, input and residual gradients; gradcheck in
float64; only one of the two outputs of the residual ops used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest
import torch

import normlib
from normlib import backends
from normlib.cpu import native

# (rtol, atol) per dtype, applied after dividing by the reference's largest magnitude (see
# assert_close_scaled). Both sides accumulate in at least float32 and round to the dtype at the
# end, so they differ by a few units in the last place (float32: 2^-24 ~ 6e-8, float16 2^-11,
# bfloat16 2^-8) plus float32 summation-order noise over up to ~4e3 terms. PyTorch's bfloat16
# and float16 RMSNorm also rounds x_hat before multiplying by the weight, a second rounding.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
WIDTHS = (1, 3, 1000, 4099)
ROWS = (1, 7)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise closeness, with atol relative to the reference's largest value (gradients of
    rows offset by 1e4 are ~1e-4, weight gradients grow with the number of rows)."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol * scale,
        msg=lambda message: f"{what} ({dtype}): {message}",
    )


def sample(shape: Sequence[int], dtype: torch.dtype, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=generator) + shift).to(dtype)


def run(fn: Callable[..., object], inputs: Sequence[torch.Tensor | None], seed: int = 99):
    """Outputs of ``fn(*leaves)`` and the gradients of every leaf for a fixed random upstream gradient."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [sample(o.shape, o.dtype, seed + i) for i, o in enumerate(outputs)]
    torch.autograd.backward(outputs, upstream)
    return [o.detach() for o in outputs], [None if t is None else t.grad for t in leaves]


def compare(ours, theirs, dtype: torch.dtype, names: Sequence[str]) -> None:
    (our_outputs, our_grads), (their_outputs, their_grads) = ours, theirs
    for i, (a, b) in enumerate(zip(our_outputs, their_outputs)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert_close_scaled(a, b, dtype, f"output {i}")
    for name, a, b in zip(names, our_grads, their_grads):
        assert (a is None) == (b is None), f"gradient of {name}: {a is None=} {b is None=}"
        if a is not None:
            assert_close_scaled(a, b, dtype, f"gradient of {name}")


@pytest.fixture(params=["native", "blocked"])
def implementation(request, monkeypatch) -> str:
    """Runs a test once with the C kernels (where the dtype allows) and once with the fallback."""
    if request.param == "native":
        if native.unavailable_reason() is not None:
            pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    else:
        monkeypatch.setattr(native, "supports", lambda dtype, name="rms_norm": False)
    return request.param


# ----------------------------------------------------------------------------------------------
# Against the "torch" backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_matches_torch(implementation, dtype, rows, width):
    x, w = sample((rows, width), dtype, 0, shift=0.5), sample((width,), dtype, 1, shift=1.0)
    for weight in (w, None):
        ours = run(lambda x, w: normlib.rms_norm(x, (width,), w, backend="cpu"), [x, weight])
        theirs = run(lambda x, w: normlib.rms_norm(x, (width,), w, backend="torch"), [x, weight])
        compare(ours, theirs, dtype, ["input", "weight"])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_rms_norm_matches_torch(implementation, dtype, rows, width):
    x, r = sample((rows, width), dtype, 0), sample((rows, width), dtype, 2, shift=3.0)
    w = sample((width,), dtype, 1, shift=1.0)
    fn = lambda backend: lambda x, r, w: normlib.add_rms_norm(x, r, (width,), w, 1e-5, backend=backend)  # noqa: E731
    compare(run(fn("cpu"), [x, r, w]), run(fn("torch"), [x, r, w]), dtype, ["input", "residual", "weight"])


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_add_layer_norm_matches_torch(implementation, dtype, rows, width):
    x, r = sample((rows, width), dtype, 0), sample((rows, width), dtype, 2, shift=3.0)
    w, b = sample((width,), dtype, 1, shift=1.0), sample((width,), dtype, 3)
    fn = lambda backend: lambda x, r, w, b: normlib.add_layer_norm(x, r, (width,), w, b, 1e-5, backend=backend)  # noqa: E731
    if implementation == "blocked" or (dtype in (torch.float32, torch.float64) and width > 1):
        theirs = run(fn("torch"), [x, r, w, b])  # the fallback runs PyTorch's LayerNorm kernels
    else:
        # The reference is the float64 computation on h rounded to the dtype (as both
        # implementations store h before normalizing it), rounded to the dtype at the end.
        # Against PyTorch's own half-precision kernels: with 3 elements per row rstd is large, and
        # PyTorch's extra roundings put its float16 input gradient 0.039 from this reference where
        # normlib's C kernel is 0.014 from it. With one element per row x - mean is exactly 0 and
        # so is the weight gradient; PyTorch's float32 mean is one rounding off, which
        # rstd = 1/sqrt(eps) ~ 316 magnifies into ~3e-5.
        def rounded_h(x, r, w, b):
            h = x + r
            h = h + (h.to(dtype).double() - h).detach()  # the rounded value, gradient unchanged
            y = torch.nn.functional.layer_norm(h, (width,), w, b, 1e-5)
            return y, h

        exact = run(rounded_h, [x.double(), r.double(), w.double(), b.double()])
        theirs = ([t.to(dtype) for t in exact[0]], [t.to(dtype) for t in exact[1]])
    compare(run(fn("cpu"), [x, r, w, b]), theirs, dtype, ["input", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_large_offset_rows(implementation, dtype):
    """Rows of 1e4 + N(0, 1): RMSNorm has no mean to cancel, but the sum of squares is ~1e8 per
    element and its gradients are ~1e-4; the float64 reference says what is right."""
    x, w = sample((7, 1000), dtype, 0, shift=1e4), sample((1000,), dtype, 1, shift=1.0)
    x64, w64 = x.double(), w.double()
    ours = run(lambda x, w: normlib.rms_norm(x, (1000,), w, 1e-6, backend="cpu"), [x, w])
    exact = run(lambda x, w: normlib.rms_norm(x, (1000,), w, 1e-6, backend="torch"), [x64, w64])
    exact = ([t.to(dtype) for t in exact[0]], [t.to(dtype) for t in exact[1]])
    compare(ours, exact, dtype, ["input", "weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_large_offset_rows_add_layer_norm(dtype):
    """h = 1e4 + N(0, 1): the mean cancels almost every digit, so the variance must be summed from
    deviations (sum(h^2)/n - mean^2 in float32 would be noise) and the mean kept finer than its
    float32 ulp at 1e4. The residual is 0 so that h is x exactly and the float64 reference
    normalizes the same row. Only the C kernels: the fallback runs PyTorch's own LayerNorm,
    which is off by 6.6e-3 (float32) and 0.27 (bfloat16) on these rows, against 1.2e-6 and 0
    for the C kernels (measured with torch 2.13.0)."""
    if dtype != torch.float64 and native.unavailable_reason("layer_norm") is not None:
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason('layer_norm')}")
    x, w = sample((7, 1000), dtype, 0, shift=1e4), sample((1000,), dtype, 1, shift=1.0)
    b, r = sample((1000,), dtype, 2), torch.zeros(7, 1000, dtype=dtype)
    fn = lambda x, r, w, b: normlib.add_layer_norm(x, r, (1000,), w, b, 1e-5, backend="cpu")  # noqa: E731
    ours = run(fn, [x, r, w, b])
    exact = run(fn, [x.double(), r.double(), w.double(), b.double()])
    exact = ([t.to(dtype) for t in exact[0]], [t.to(dtype) for t in exact[1]])
    compare(ours, exact, dtype, ["input", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous_inputs(implementation, dtype, layout):
    base = sample((5, 6, 33), dtype, 0)
    if layout == "transposed":  # (6, 5, 33) with the two leading dims swapped in memory
        x = base.transpose(0, 1)
    elif layout == "sliced":  # every other element of a wider row
        x = sample((5, 6, 66), dtype, 0)[..., ::2]
    else:  # one row repeated through a zero stride
        x = base[:1].expand(5, 6, 33)
    r = sample(x.shape, dtype, 4).transpose(0, 1).contiguous().transpose(0, 1)
    w = sample((33,), dtype, 1, shift=1.0)
    assert not x.is_contiguous()
    rms = lambda backend: lambda x, w: normlib.rms_norm(x, (33,), w, backend=backend)  # noqa: E731
    compare(run(rms("cpu"), [x, w]), run(rms("torch"), [x, w]), dtype, ["input", "weight"])
    add = lambda backend: lambda x, r, w: normlib.add_rms_norm(x, r, (33,), w, backend=backend)  # noqa: E731
    compare(run(add("cpu"), [x, r, w]), run(add("torch"), [x, r, w]), dtype, ["input", "residual", "weight"])
    ln = lambda backend: lambda x, r, w: normlib.add_layer_norm(x, r, (33,), w, None, backend=backend)  # noqa: E731
    compare(run(ln("cpu"), [x, r, w]), run(ln("torch"), [x, r, w]), dtype, ["input", "residual", "weight"])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 5)])
def test_two_normalized_dims(implementation, shape):
    """Rows of 4 * 5 = 20 values, with leading dims and without (a 2-D input that is one row)."""
    x, w = sample(shape, torch.float32, 0), sample((4, 5), torch.float32, 1, shift=1.0)
    rms = lambda backend: lambda x, w: normlib.rms_norm(x, (4, 5), w, backend=backend)  # noqa: E731
    compare(run(rms("cpu"), [x, w]), run(rms("torch"), [x, w]), torch.float32, ["input", "weight"])
    r = sample(shape, torch.float32, 2)
    add = lambda backend: lambda x, r, w: normlib.add_rms_norm(x, r, (4, 5), w, backend=backend)  # noqa: E731
    compare(run(add("cpu"), [x, r, w]), run(add("torch"), [x, r, w]), torch.float32, ["input", "residual", "weight"])
    b = sample((4, 5), torch.float32, 3)
    ln = lambda backend: lambda x, r, w, b: normlib.add_layer_norm(x, r, (4, 5), w, b, backend=backend)  # noqa: E731
    compare(run(ln("cpu"), [x, r, w, b]), run(ln("torch"), [x, r, w, b]), torch.float32, ["input", "residual", "weight", "bias"])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_mixed_weight_dtype_follows_torch():
    """A bfloat16 input with a float32 weight (the blocked path): the output keeps the input's dtype, as in PyTorch."""
    x, w = sample((7, 64), torch.bfloat16, 0), sample((64,), torch.float32, 1, shift=1.0)
    rms = lambda backend: lambda x, w: normlib.rms_norm(x, (64,), w, backend=backend)  # noqa: E731
    compare(run(rms("cpu"), [x, w]), run(rms("torch"), [x, w]), torch.bfloat16, ["input", "weight"])


@pytest.mark.parametrize("used", ["y", "h"])
def test_residual_ops_with_one_output_used(implementation, used):
    """Only y feeds the loss (dh is None) or only h does (dy is None): the gradients still match."""
    x, r, w = sample((7, 50), torch.float32, 0), sample((7, 50), torch.float32, 1), sample((50,), torch.float32, 2)
    pick = 0 if used == "y" else 1
    for op in (normlib.add_rms_norm, lambda x, r, s, w, backend: normlib.add_layer_norm(x, r, s, w, None, backend=backend)):
        fn = lambda backend: lambda x, r, w: op(x, r, (50,), w, backend=backend)[pick]  # noqa: E731
        compare(run(fn("cpu"), [x, r, w]), run(fn("torch"), [x, r, w]), torch.float32, ["input", "residual", "weight"])


def test_inference_and_empty_batches(implementation):
    x, w = sample((7, 40), torch.float32, 0), sample((40,), torch.float32, 1)
    with torch.no_grad():
        ours = normlib.rms_norm(x, (40,), w, backend="cpu")
    assert not ours.requires_grad
    torch.testing.assert_close(ours, normlib.rms_norm(x, (40,), w, backend="torch"))
    empty = torch.empty(0, 40, requires_grad=True)
    y = normlib.rms_norm(empty, (40,), w.requires_grad_(), backend="cpu")
    y.sum().backward()
    assert y.shape == (0, 40) and empty.grad.shape == (0, 40)
    torch.testing.assert_close(w.grad, torch.zeros(40))
    w.grad = None
    b = torch.zeros(40, requires_grad=True)
    y, h = normlib.add_layer_norm(empty, empty, (40,), w, b, backend="cpu")
    (y.sum() + h.sum()).backward()
    assert y.shape == h.shape == (0, 40)
    torch.testing.assert_close(w.grad, torch.zeros(40))
    torch.testing.assert_close(b.grad, torch.zeros(40))


# ----------------------------------------------------------------------------------------------
# Gradients from first principles, and the C kernels against float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 3, 17])
def test_gradcheck_float64(width):
    """float64 runs the blocked path (the C kernels store float32 at most)."""
    x = sample((3, width), torch.float64, 0).requires_grad_()
    r = sample((3, width), torch.float64, 1).requires_grad_()
    w = sample((width,), torch.float64, 2, shift=1.0).requires_grad_()
    b = sample((width,), torch.float64, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: normlib.rms_norm(x, (width,), w, 1e-5, backend="cpu"), (x, w))
    assert torch.autograd.gradcheck(lambda x, r, w: normlib.add_rms_norm(x, r, (width,), w, 1e-5, backend="cpu"), (x, r, w))
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: normlib.add_layer_norm(x, r, (width,), w, b, 1e-5, backend="cpu"), (x, r, w, b)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_c_kernels_against_float64(dtype):
    """The C kernels round once; against the float64 computation they are within a few ulps."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    x, r = sample((7, 1000), dtype, 0), sample((7, 1000), dtype, 1, shift=2.0)
    w = sample((1000,), dtype, 2, shift=1.0)
    fn = lambda x, r, w: normlib.add_rms_norm(x, r, (1000,), w, 1e-6, backend="cpu")  # noqa: E731
    ours = run(fn, [x, r, w])
    exact = run(fn, [x.double(), r.double(), w.double()])
    exact = ([t.to(dtype) for t in exact[0]], [t.to(dtype) for t in exact[1]])
    compare(ours, exact, dtype, ["input", "residual", "weight"])


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_c_kernels_split_rows_across_threads(monkeypatch, threads, dtype):
    """Small tensors run on one thread; forcing the count tests the row split (37 rows do not
    divide evenly, 5 threads on a 2-core machine) and the per-thread sums of the weight gradient."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    monkeypatch.setattr(native, "_threads", lambda elements, dtype: threads)
    x, r = sample((37, 100), dtype, 0), sample((37, 100), dtype, 1)
    w = sample((100,), dtype, 2, shift=1.0)
    rms = lambda backend: lambda x, w: normlib.rms_norm(x, (100,), w, backend=backend)  # noqa: E731
    compare(run(rms("cpu"), [x, w]), run(rms("torch"), [x, w]), dtype, ["input", "weight"])
    add = lambda backend: lambda x, r, w: normlib.add_rms_norm(x, r, (100,), w, backend=backend)  # noqa: E731
    compare(run(add("cpu"), [x, r, w]), run(add("torch"), [x, r, w]), dtype, ["input", "residual", "weight"])
    b = sample((100,), dtype, 3)
    ln = lambda backend: lambda x, r, w, b: normlib.add_layer_norm(x, r, (100,), w, b, backend=backend)  # noqa: E731
    compare(run(ln("cpu"), [x, r, w, b]), run(ln("torch"), [x, r, w, b]), dtype, ["input", "residual", "weight", "bias"])


def test_nan_and_infinity_propagate(implementation):
    x = sample((3, 8), torch.bfloat16, 0)
    x[0, 2], x[1, 5] = float("nan"), float("inf")
    y = normlib.rms_norm(x, (8,), backend="cpu")
    assert y[0].isnan().all() and y[1].isnan().any() and y[2].isfinite().all()


# ----------------------------------------------------------------------------------------------
# Dispatch and the C build
# ----------------------------------------------------------------------------------------------


def test_auto_picks_the_cpu_path_for_rms_norm_and_the_residual_adds_only():
    x = torch.randn(2, 8)
    c_kernels = native.unavailable_reason("rms_norm") is None and native.unavailable_reason("layer_norm") is None
    expected = ("rms_norm_c", "add_rms_norm_c", "add_layer_norm_c") if c_kernels else (
        "rms_norm_blocked", "add_rms_norm_blocked", "add_layer_norm_aten")
    got = tuple(backends.resolve(op, "auto", x).__name__ for op in ("rms_norm", "add_rms_norm", "add_layer_norm"))
    assert got == expected
    # PyTorch's own CPU kernels are one pass already: auto keeps them
    for op in ("layer_norm", "batch_norm", "group_norm", "instance_norm"):
        assert "cpu" not in backends.IMPLEMENTATIONS[op]
        assert backends.resolve(op, "auto", x).__name__ == f"{op}_torch"

def test_without_a_compiler_the_fallback_runs(tmp_path):
    """A fresh process whose C compiler is missing: the reason is reported, results stay right."""
    script = (
        "import torch, normlib\n"
        "from normlib.cpu import native\n"
        "assert native.unavailable_reason() is not None and 'compiler' in native.unavailable_reason()\n"
        "x = torch.randn(5, 9)\n"
        "torch.testing.assert_close(normlib.rms_norm(x, 9, backend='cpu'), normlib.rms_norm(x, 9, backend='torch'))\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), NORMLIB_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_build_in_a_fresh_cache(tmp_path):
    """The first use in a fresh process compiles into an empty cache (as on a CI machine)."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    script = (
        "import time, torch, normlib\n"
        "from normlib.cpu import native\n"
        "x = torch.randn(64, 256)\n"
        "start = time.perf_counter(); normlib.rms_norm(x, 256, backend='cpu'); first = time.perf_counter() - start\n"
        "assert native.unavailable_reason() is None, native.unavailable_reason()\n"
        "normlib.add_layer_norm(x, x, 256, backend='cpu')\n"
        "assert native.unavailable_reason('layer_norm') is None, native.unavailable_reason('layer_norm')\n"
        "print(first)\n"
    )
    env = dict(os.environ, NORMLIB_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in native.KERNELS:
        assert list(tmp_path.glob(f"{name}_*.so")), f"no {name} library was written to the cache"


def test_c_kernels_take_their_arguments_by_name():
    """The extensions' functions take each argument by name, in any order, and refuse a call that
    does not fit with an error naming the argument, rather than reading a wrong position."""
    for name in native.KERNELS:
        if native.unavailable_reason(name) is not None:
            pytest.skip(f"C kernels unavailable: {native.unavailable_reason(name)}")
    rms, layer_norm = native.extension("rms_norm"), native.extension("layer_norm")
    x, gamma = sample((3, 5), torch.float32, 0), sample((5,), torch.float32, 1, shift=1.0)
    y = torch.empty_like(x)
    sizes = dict(storage=native.STORAGE_CODES[torch.float32], rows=3, n=5, eps=1e-6, threads=1)
    # a name built at run time is not interned: found by comparing the text
    sizes["".join(["thr", "eads"])] = sizes.pop("threads")
    assert rms.forward(y=y.data_ptr(), gamma=gamma.data_ptr(), x=x.data_ptr(), **sizes) == 1
    torch.testing.assert_close(y, normlib.rms_norm(x, (5,), gamma, 1e-6, backend="torch"))

    arguments = dict(x=x.data_ptr(), gamma=gamma.data_ptr(), y=y.data_ptr(), **sizes)
    with pytest.raises(TypeError, match="by name"):
        rms.forward(*arguments.values())
    with pytest.raises(TypeError, match="missing required argument 'y'"):
        rms.forward(**{k: v for k, v in arguments.items() if k != "y"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta'"):
        rms.forward(beta=gamma.data_ptr(), **arguments)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dx'"):
        rms.forward(dx=y.data_ptr(), **arguments)
    with pytest.raises(ValueError, match="residual and h"):
        rms.forward(residual=x.data_ptr(), **arguments)
    with pytest.raises(ValueError, match="storage"):
        rms.forward(**{**arguments, "storage": 7})
    with pytest.raises(ValueError, match="rows and n"):
        rms.forward(**{**arguments, "rows": -1})
    dgamma = torch.empty_like(gamma)
    with pytest.raises(ValueError, match="dgamma and dbeta"):
        layer_norm.backward(dy=x.data_ptr(), x=x.data_ptr(), gamma=gamma.data_ptr(), dgamma=dgamma.data_ptr(), **sizes)


def test_kernels_run_in_pytorchs_openmp_threads():
    """Linux with PyTorch's libgomp: the extensions use that very runtime, never a second copy."""
    if native.torch_openmp_runtime() is None:
        pytest.skip("PyTorch has loaded no GNU OpenMP runtime here")
    for name in native.KERNELS:
        if native.unavailable_reason(name) is not None:
            pytest.skip(f"C kernels unavailable: {native.unavailable_reason(name)}")
        assert native.extension(name).threading() == "openmp", name
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    assert runtimes == {native.torch_openmp_runtime()}, runtimes


def test_pthreads_build_when_pytorch_has_no_openmp(tmp_path):
    """Where PyTorch brought no libgomp, the kernels are built with pthreads and give the same results."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}")
    script = (
        "import torch, normlib\n"
        "from normlib.cpu import native\n"
        "native.torch_openmp_runtime = lambda: None\n"
        "native._threads = lambda elements, dtype: 3\n"
        "for name in native.KERNELS:\n"
        "    assert native.extension(name).threading() == 'pthreads', name\n"
        "x, r, w, b = torch.randn(37, 64), torch.randn(37, 64), torch.rand(64) + 0.5, torch.randn(64)\n"
        "for t in (x, w, b): t.requires_grad_()\n"
        "for backend in ('cpu', 'torch'):\n"
        "    y = normlib.rms_norm(x, 64, w, backend=backend) + normlib.add_layer_norm(x, r, 64, w, b, backend=backend)[0]\n"
        "    grads = torch.autograd.grad(y.square().sum(), (x, w, b))\n"
        "    if backend == 'cpu': ours = (y, *grads)\n"
        "for a, e in zip(ours, (y, *grads)): torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)\n"
    )
    env = dict(os.environ, NORMLIB_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
