"""normlib's functional ops against their torch.nn.functional twins: forward and backward.

Every op runs with backend="torch" here (the baseline other backends are tested against) and
also through "auto", over four dtypes, awkward shapes (width 1, non-powers of two, a 4099-wide
row) and non-contiguous inputs; running statistics are compared after in-place updates. Then
gradcheck in float64, fp32 stability on inputs with a large mean, empty batches and constant rows.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from norm_cases import DTYPES, TOLERANCES, assert_close_all, forward_backward, randn, with_layout

import normlib

# (input shape, normalized_shape) for the row-wise norms: width 1, odd widths, two normalized
# dims, and a wide row that is not a power of two.
ROW_CASES = [((3, 1), (1,)), ((5, 7), (7,)), ((2, 3, 33), (33,)), ((4, 3, 5), (3, 5)), ((2, 4099), (4099,))]
# (N, C, *spatial) for the channel-wise norms; (2, 3) has no spatial dims (BatchNorm1d on features).
CHANNEL_SHAPES = [(2, 3), (4, 6, 5), (3, 4, 5, 7), (2, 4, 1025)]


def matrix(shapes, layouts=("contiguous", "transposed", "sliced")):
    """(shape, dtype, layout, backend) cases: every dtype contiguous, the other layouts in float32
    and bfloat16, and "auto" (whatever backend this machine picks) in float32 and float16."""
    cases = []
    for shape in shapes:
        for dtype in DTYPES:
            cases.append(pytest.param(shape, dtype, "contiguous", "torch", id=f"{shape}-{dtype}-contiguous-torch"))
        is_image = len(shape) == 4 and all(isinstance(size, int) for size in shape)  # (N, C, H, W)
        for layout in layouts[1:] + (("channels_last",) if is_image else ()):
            for dtype in (torch.float32, torch.bfloat16):
                cases.append(pytest.param(shape, dtype, layout, "torch", id=f"{shape}-{dtype}-{layout}-torch"))
        for dtype in (torch.float32, torch.float16):
            cases.append(pytest.param(shape, dtype, layouts[1], "auto", id=f"{shape}-{dtype}-{layouts[1]}-auto"))
    return cases


def params(shape, dtype, seed=10):
    """A weight near 1 and a bias near 0 of ``shape``: non-trivial but well-conditioned."""
    return randn(shape, dtype, seed=seed, scale=0.5, shift=1.0), randn(shape, dtype, seed=seed + 1, scale=0.5)


def groups_for(channels: int) -> int:
    return channels // 2 if channels % 2 == 0 else 1


# ---------------------------------------------------------------------------------------------
# Row-wise norms: layer_norm, rms_norm and their fused residual versions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,dtype,layout,backend", matrix(ROW_CASES))
def test_layer_norm_matches_torch(case, dtype, layout, backend):
    shape, normalized_shape = case
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    w, b = params(normalized_shape, dtype)
    ours = forward_backward(lambda x, w, b: normlib.layer_norm(x, normalized_shape, w, b, 1e-5, backend=backend), [x, w, b], layout)
    theirs = forward_backward(lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, 1e-5), [x, w, b], layout)
    assert_close_all(ours[0], theirs[0], dtype, "output")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, weight, bias)")


@pytest.mark.parametrize("case,dtype,layout,backend", matrix(ROW_CASES))
def test_rms_norm_matches_torch(case, dtype, layout, backend):
    shape, normalized_shape = case
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    w, _ = params(normalized_shape, dtype)
    # eps=None: both sides must pick torch.finfo(dtype).eps
    ours = forward_backward(lambda x, w: normlib.rms_norm(x, normalized_shape, w, backend=backend), [x, w], layout)
    theirs = forward_backward(lambda x, w: F.rms_norm(x, normalized_shape, w), [x, w], layout)
    assert_close_all(ours[0], theirs[0], dtype, "output")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, weight)")


@pytest.mark.parametrize("case,dtype,layout,backend", matrix(ROW_CASES, ("contiguous", "transposed")))
def test_add_layer_norm_is_add_then_layer_norm(case, dtype, layout, backend):
    shape, normalized_shape = case
    x, r = randn(shape, dtype, seed=0), randn(shape, dtype, seed=1, shift=3.0)
    w, b = params(normalized_shape, dtype)

    def unfused(x, r, w, b):
        h = x + r
        return F.layer_norm(h, normalized_shape, w, b, 1e-5), h

    fused = lambda x, r, w, b: normlib.add_layer_norm(x, r, normalized_shape, w, b, 1e-5, backend=backend)  # noqa: E731
    ours, theirs = forward_backward(fused, [x, r, w, b], layout), forward_backward(unfused, [x, r, w, b], layout)
    assert_close_all(ours[0], theirs[0], dtype, "(y, h)")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, residual, weight, bias)")


@pytest.mark.parametrize("case,dtype,layout,backend", matrix(ROW_CASES, ("contiguous", "sliced")))
def test_add_rms_norm_is_add_then_rms_norm(case, dtype, layout, backend):
    shape, normalized_shape = case
    x, r = randn(shape, dtype, seed=0), randn(shape, dtype, seed=1, shift=3.0)
    w, _ = params(normalized_shape, dtype)

    def unfused(x, r, w):
        h = x + r
        return F.rms_norm(h, normalized_shape, w), h

    fused = lambda x, r, w: normlib.add_rms_norm(x, r, normalized_shape, w, backend=backend)  # noqa: E731
    ours, theirs = forward_backward(fused, [x, r, w], layout), forward_backward(unfused, [x, r, w], layout)
    assert_close_all(ours[0], theirs[0], dtype, "(y, h)")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, residual, weight)")


def test_row_norms_without_affine_parameters():
    x = randn((4, 9))
    tolerance = TOLERANCES[torch.float32]
    torch.testing.assert_close(normlib.layer_norm(x, 9), F.layer_norm(x, (9,)), **tolerance)
    torch.testing.assert_close(normlib.rms_norm(x, [9]), F.rms_norm(x, [9]), **tolerance)
    torch.testing.assert_close(normlib.rms_norm(x, (9,), eps=0.5), F.rms_norm(x, (9,), eps=0.5), **tolerance)


# ---------------------------------------------------------------------------------------------
# Channel-wise norms: batch_norm, group_norm, instance_norm
# ---------------------------------------------------------------------------------------------


def running_stats(channels, dtype):
    return randn((channels,), dtype, seed=20, scale=0.3), randn((channels,), dtype, seed=21).abs() + 0.5


@pytest.mark.parametrize("mode", ["train", "train_without_running_stats", "eval"])
@pytest.mark.parametrize("shape,dtype,layout,backend", matrix(CHANNEL_SHAPES))
def test_batch_norm_matches_torch(shape, dtype, layout, backend, mode):
    channels = shape[1]
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    w, b = params((channels,), dtype)
    training = mode != "eval"
    stats = {name: running_stats(channels, dtype) for name in ("ours", "theirs")}
    if mode == "train_without_running_stats":
        stats = {name: (None, None) for name in stats}

    def ours_fn(x, w, b):
        return normlib.batch_norm(x, *stats["ours"], w, b, training, 0.3, 1e-5, backend=backend)

    def theirs_fn(x, w, b):
        return F.batch_norm(x, *stats["theirs"], w, b, training, 0.3, 1e-5)

    ours, theirs = forward_backward(ours_fn, [x, w, b], layout), forward_backward(theirs_fn, [x, w, b], layout)
    assert_close_all(ours[0], theirs[0], dtype, "output")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, weight, bias)")
    assert_close_all(stats["ours"], stats["theirs"], dtype, "running (mean, var) after the step")


@pytest.mark.parametrize("shape,dtype,layout,backend", matrix(CHANNEL_SHAPES))
def test_group_norm_matches_torch(shape, dtype, layout, backend):
    groups = groups_for(shape[1])
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    w, b = params((shape[1],), dtype)
    ours = forward_backward(lambda x, w, b: normlib.group_norm(x, groups, w, b, 1e-5, backend=backend), [x, w, b], layout)
    theirs = forward_backward(lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5), [x, w, b], layout)
    assert_close_all(ours[0], theirs[0], dtype, "output")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, weight, bias)")


@pytest.mark.parametrize("mode", ["input_stats", "input_stats_updating_running", "running_stats"])
@pytest.mark.parametrize("shape,dtype,layout,backend", matrix([s for s in CHANNEL_SHAPES if len(s) >= 3]))
def test_instance_norm_matches_torch(shape, dtype, layout, backend, mode):
    channels = shape[1]
    x = randn(shape, dtype, scale=2.0, shift=0.5)
    w, b = params((channels,), dtype)
    use_input_stats = mode != "running_stats"
    stats = {name: running_stats(channels, dtype) for name in ("ours", "theirs")}
    if mode == "input_stats":
        stats = {name: (None, None) for name in stats}

    def ours_fn(x, w, b):
        return normlib.instance_norm(x, *stats["ours"], w, b, use_input_stats, 0.3, 1e-5, backend=backend)

    def theirs_fn(x, w, b):
        return F.instance_norm(x, *stats["theirs"], w, b, use_input_stats, 0.3, 1e-5)

    ours, theirs = forward_backward(ours_fn, [x, w, b], layout), forward_backward(theirs_fn, [x, w, b], layout)
    assert_close_all(ours[0], theirs[0], dtype, "output")
    assert_close_all(ours[1], theirs[1], dtype, "grads (input, weight, bias)")
    assert_close_all(stats["ours"], stats["theirs"], dtype, "running (mean, var) after the step")


def test_batch_norm_running_stats_over_several_steps():
    """Five in-place updates in a row, including one in evaluation that must change nothing."""
    ours, theirs = running_stats(5, torch.float32), running_stats(5, torch.float32)
    for step, training in enumerate([True, True, False, True, True]):
        x = randn((7, 5, 3), seed=step, scale=1.0 + step, shift=step)
        torch.testing.assert_close(
            normlib.batch_norm(x, *ours, training=training, momentum=0.2), F.batch_norm(x, *theirs, training=training, momentum=0.2)
        )
        assert_close_all(ours, theirs, torch.float32, f"running stats after step {step}")
    assert not torch.equal(ours[0], running_stats(5, torch.float32)[0]), "the running mean never moved"


# ---------------------------------------------------------------------------------------------
# gradcheck: the backward pass is the derivative of the forward pass (float64, small shapes)
# ---------------------------------------------------------------------------------------------


def gradcheck_cases():
    x = randn((2, 4, 5), torch.float64, seed=3)
    r = randn((2, 4, 5), torch.float64, seed=4)
    w5, b5 = params((5,), torch.float64)
    w4, b4 = params((4,), torch.float64)
    mean4, var4 = running_stats(4, torch.float64)
    return {
        "layer_norm": (lambda x, w, b: normlib.layer_norm(x, (5,), w, b), (x, w5, b5)),
        "rms_norm": (lambda x, w: normlib.rms_norm(x, (5,), w), (x, w5)),
        "add_layer_norm": (lambda x, r, w, b: normlib.add_layer_norm(x, r, (5,), w, b), (x, r, w5, b5)),
        "add_rms_norm": (lambda x, r, w: normlib.add_rms_norm(x, r, (5,), w), (x, r, w5)),
        "batch_norm_train": (lambda x, w, b: normlib.batch_norm(x, None, None, w, b, True), (x, w4, b4)),
        "batch_norm_eval": (lambda x, w, b: normlib.batch_norm(x, mean4, var4, w, b, False), (x, w4, b4)),
        "group_norm": (lambda x, w, b: normlib.group_norm(x, 2, w, b), (x, w4, b4)),
        "instance_norm": (lambda x, w, b: normlib.instance_norm(x, weight=w, bias=b), (x, w4, b4)),
        "instance_norm_running": (lambda x, w, b: normlib.instance_norm(x, mean4, var4, w, b, False), (x, w4, b4)),
    }


@pytest.mark.parametrize("name", list(gradcheck_cases()))
def test_gradcheck(name):
    fn, tensors = gradcheck_cases()[name]
    leaves = tuple(t.clone().requires_grad_() for t in tensors)
    # fast_mode compares random projections of the Jacobians instead of every entry: the same
    # check of the backward formula at a fraction of the forward evaluations.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Numerics: large means, empty batches, constant rows
# ---------------------------------------------------------------------------------------------


def every_op(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every functional op on x of shape (N, C, H, W), reducing over at least 36 values per statistic."""
    c, w = x.shape[1], x.shape[-1]
    return {
        "layer_norm": normlib.layer_norm(x, x.shape[1:]),
        "rms_norm": normlib.rms_norm(x, (w,)),
        "add_layer_norm": normlib.add_layer_norm(x, torch.zeros_like(x), (w,))[0],
        "add_rms_norm": normlib.add_rms_norm(x, torch.zeros_like(x), (w,))[0],
        "batch_norm": normlib.batch_norm(x, torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype), training=True),
        "group_norm": normlib.group_norm(x, 2, None, None),
        "instance_norm": normlib.instance_norm(x),
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp32_input_with_large_mean_normalizes_correctly(layout):
    """1e4 + N(0, 1) in fp32: x^2 ~ 1e8 has an ulp of 8, so E[x^2] - E[x]^2 would be rounding noise.

    The fp32 input itself is exact; what remains is the fp32 rounding of the mean (ulp(1e4)/2 ~
    5e-4 relative to a unit std), hence 5e-3.
    """
    x = randn((8, 4, 6, 36), shift=1e4)
    x = with_layout(x, layout)
    expected = every_op(x.double())
    for name, actual in every_op(x).items():
        torch.testing.assert_close(actual.double(), expected[name], rtol=0, atol=5e-3, msg=lambda m: f"{name}: {m}")
        if "rms" not in name:  # RMSNorm does not center: 1e4 + noise maps to ~1, not to the noise
            assert actual.std() > 0.9, f"{name}: output lost the signal (std {actual.std():.3g})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_are_accumulated_in_float32(dtype):
    """8 + N(0, 1) with 4096 values per statistic: in float16 their sum (~3.3e4) has an ulp of 32
    and their sum of squares (~2.7e5) overflows to inf, so accumulating in the input dtype would
    give a useless mean and an infinite RMS. Outputs must match float64 at the dtype's tolerance."""
    x = randn((2, 4, 4096), dtype, shift=8.0)
    expected = every_op(x.double().unsqueeze(2))  # (N, C, 1, L): every_op wants 4-D
    for name, actual in every_op(x.unsqueeze(2)).items():
        assert actual.dtype == dtype, name
        assert_close_all([actual.double()], [expected[name]], dtype, name)


def test_empty_batch_behaves_like_torch():
    mean, var = running_stats(3, torch.float32)
    ours_stats, theirs_stats = (mean.clone(), var.clone()), (mean.clone(), var.clone())
    x = torch.empty(0, 3, 4)
    pairs = {
        "layer_norm": (normlib.layer_norm(x, (4,)), F.layer_norm(x, (4,))),
        "rms_norm": (normlib.rms_norm(x, (4,)), F.rms_norm(x, (4,))),
        "batch_norm": (normlib.batch_norm(x, *ours_stats, training=True), F.batch_norm(x, *theirs_stats, training=True)),
        "group_norm": (normlib.group_norm(x, 3), F.group_norm(x, 3)),
        "instance_norm": (normlib.instance_norm(x), F.instance_norm(x)),
    }
    for name, (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape == x.shape, name
    assert_close_all(ours_stats, theirs_stats, torch.float32, "running stats after an empty batch")
    assert torch.isfinite(ours_stats[1]).all(), "an empty batch made the running variance NaN"


def test_constant_rows_give_the_bias_not_nan():
    """Zero variance: x - mean is 0 (up to the rounding of the mean) and rstd = 1/sqrt(eps) is
    finite, so y is the bias, as in torch; no 0/0."""
    x = torch.full((4, 6, 5), 3.0)
    row_bias, channel_bias = torch.arange(5.0), torch.arange(6.0)
    ones5, ones6 = torch.ones(5), torch.ones(6)
    pairs = {
        "layer_norm": (normlib.layer_norm(x, (5,), ones5, row_bias), F.layer_norm(x, (5,), ones5, row_bias), row_bias),
        "batch_norm": (
            normlib.batch_norm(x, None, None, ones6, channel_bias, training=True),
            F.batch_norm(x, None, None, ones6, channel_bias, training=True),
            channel_bias.view(6, 1),
        ),
        "group_norm": (normlib.group_norm(x, 3, ones6, channel_bias), F.group_norm(x, 3, ones6, channel_bias), channel_bias.view(6, 1)),
        "instance_norm": (
            normlib.instance_norm(x, weight=ones6, bias=channel_bias),
            F.instance_norm(x, weight=ones6, bias=channel_bias),
            channel_bias.view(6, 1),
        ),
    }
    for name, (ours, theirs, bias) in pairs.items():
        torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name} vs torch: {m}")
        # rstd = 1/sqrt(1e-5) ~ 316 amplifies the fp32 rounding of the mean (~2e-7 * 3)
        torch.testing.assert_close(ours, bias.expand_as(x), rtol=0, atol=1e-3, msg=lambda m: f"{name} vs bias: {m}")
    zeros = torch.zeros(2, 5)
    torch.testing.assert_close(normlib.rms_norm(zeros, (5,)), F.rms_norm(zeros, (5,)))
    assert torch.isfinite(normlib.rms_norm(zeros, (5,))).all()


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"])
def test_auto_never_sends_float64_to_the_float32_triton_kernels(op, monkeypatch):
    """Where "auto" picks Triton (CUDA), float64 input goes to PyTorch instead, and naming
    backend="triton" for it is an error; float32 still reaches the kernels."""
    from normlib import backends

    if "triton" not in normlib.available_backends(op, "cpu"):
        pytest.skip("triton does not run on this machine's CPU (TRITON_INTERPRET is off)")
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    monkeypatch.setattr(backends, "_CANDIDATES", {})
    function = getattr(normlib, op)
    x = torch.randn(3, 8, dtype=torch.float64) * 5 + 3
    residual = (torch.randn(3, 8, dtype=torch.float64),) if op.startswith("add_") else ()
    out = function(x, *residual, 8)
    expected = function(x, *residual, 8, backend="torch")
    for mine, torchs in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        assert mine.dtype == torch.float64
        torch.testing.assert_close(mine, torchs, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="float64"):
        function(x, *residual, 8, backend="triton")
    fired = []
    kernel_module = importlib.import_module(f"normlib.kernels.{op.removeprefix('add_')}")
    fused = "_rms_norm_fwd_op" if "rms" in op else "_layer_norm_fwd_op"
    original = getattr(kernel_module, fused)
    monkeypatch.setattr(kernel_module, fused, lambda *args: fired.append(1) or original(*args))
    function(x.float(), *(r.float() for r in residual), 8)
    assert fired, "auto should still send float32 to the Triton kernels"


@pytest.mark.parametrize("backend", normlib.available_backends("rms_norm", "cpu"))
def test_complex_rms_norm_matches_torch(backend):
    """torch.nn.functional.rms_norm takes complex input (|x|^2 in the mean); normlib computes it
    with PyTorch's op on every backend that can (the fused kernels are real-valued) and the Triton
    backend refuses it."""
    x = torch.randn(4, 6, dtype=torch.complex128, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64) + 0.5
    if backend == "triton":
        with pytest.raises(TypeError, match="complex128"):
            normlib.rms_norm(x, 6, weight, backend=backend)
        return
    ours = normlib.rms_norm(x, 6, weight, backend=backend)
    theirs = F.rms_norm(x, (6,), weight, eps=torch.finfo(torch.float64).eps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad(ours.abs().sum(), x)
    (grad_theirs,) = torch.autograd.grad(theirs.abs().sum(), x)
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_batch_norm_takes_an_empty_one_dimensional_input_like_torch():
    empty = torch.randn(0)
    for training in (False, True):
        out = normlib.batch_norm(empty, torch.empty(0), torch.empty(0), training=training)
        assert out.shape == F.batch_norm(empty, torch.empty(0), torch.empty(0), training=training).shape == (0,)
