"""The float64 NumPy references (forward, backward, running statistics) against PyTorch.

In float64 the references must agree with torch.nn.functional and its autograd to ~1e-9; then
normlib's ops in every dtype must agree with the reference evaluated on the same rounded input,
at that dtype's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from norm_cases import DTYPES, TOLERANCES, assert_close_to_reference, randn, to_numpy

import normlib
from normlib._checks import RMS_NORM_DEFAULT_EPS
from normlib.batch_norm import batch_norm_reference, batch_norm_reference_backward
from normlib.group_norm import group_norm_reference, group_norm_reference_backward
from normlib.instance_norm import instance_norm_reference, instance_norm_reference_backward
from normlib.layer_norm import (
    add_layer_norm_reference,
    add_layer_norm_reference_backward,
    layer_norm_reference,
    layer_norm_reference_backward,
)
from normlib.rms_norm import (
    add_rms_norm_reference,
    add_rms_norm_reference_backward,
    rms_norm_reference,
    rms_norm_reference_backward,
)

F64 = TOLERANCES[torch.float64]


def autograd(fn, tensors, upstream):
    """Outputs and gradients of ``fn`` in float64 via torch autograd; None stays None."""
    leaves = [None if t is None else t.double().clone().requires_grad_() for t in tensors]
    outputs = fn(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    torch.autograd.backward(outputs, [u.double() for u in upstream])
    return [o.detach().numpy() for o in outputs], [None if leaf is None else leaf.grad.numpy() for leaf in leaves]


def assert_numpy_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=F64["rtol"], atol=F64["atol"], err_msg=what)


def affine(shape, with_weight=True, with_bias=True):
    weight = randn(shape, torch.float64, seed=30, scale=0.5, shift=1.0) if with_weight else None
    bias = randn(shape, torch.float64, seed=31) if with_bias else None
    return weight, bias


# ---------------------------------------------------------------------------------------------
# Row-wise norms
# ---------------------------------------------------------------------------------------------

ROW_CASES = [((5, 7), (7,)), ((2, 3, 4), (3, 4)), ((4, 1), (1,)), ((3, 130), (130,))]


@pytest.mark.parametrize("with_weight,with_bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape,normalized_shape", ROW_CASES)
def test_layer_norm_reference(shape, normalized_shape, with_weight, with_bias):
    x = randn(shape, torch.float64, scale=3.0, shift=1.0)
    weight, bias = affine(normalized_shape, with_weight, with_bias)
    dy = randn(shape, torch.float64, seed=5)
    y, cache = layer_norm_reference(x.numpy(), normalized_shape, to_numpy(weight), to_numpy(bias), 1e-5)
    (expected_y,), (dx, dw, db) = autograd(lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, 1e-5), [x, weight, bias], [dy])
    assert_numpy_close(y, expected_y, "y")
    _, mean, rstd = torch.native_layer_norm(x, normalized_shape, None, None, 1e-5)
    assert_numpy_close(cache.mean.reshape(-1), mean.reshape(-1).numpy(), "mean")
    assert_numpy_close(cache.rstd.reshape(-1), rstd.reshape(-1).numpy(), "rstd")
    ref_dx, ref_dw, ref_db = layer_norm_reference_backward(dy.numpy(), cache, to_numpy(weight))
    assert_numpy_close(ref_dx, dx, "dx")
    if with_weight:
        assert_numpy_close(ref_dw, dw, "dweight")
    if with_bias:
        assert_numpy_close(ref_db, db, "dbias")


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("shape,normalized_shape", ROW_CASES)
def test_rms_norm_reference(shape, normalized_shape, with_weight):
    x = randn(shape, torch.float64, scale=3.0, shift=1.0)
    weight, _ = affine(normalized_shape, with_weight, False)
    dy = randn(shape, torch.float64, seed=5)
    y, cache = rms_norm_reference(x.numpy(), normalized_shape, to_numpy(weight), 1e-3)
    (expected_y,), (dx, dw) = autograd(lambda x, w: F.rms_norm(x, normalized_shape, w, 1e-3), [x, weight], [dy])
    assert_numpy_close(y, expected_y, "y")
    ref_dx, ref_dw = rms_norm_reference_backward(dy.numpy(), cache, to_numpy(weight))
    assert_numpy_close(ref_dx, dx, "dx")
    if with_weight:
        assert_numpy_close(ref_dw, dw, "dweight")


def test_add_layer_norm_reference():
    shape, normalized_shape = (3, 4, 6), (6,)
    x, residual = randn(shape, torch.float64, seed=1), randn(shape, torch.float64, seed=2, shift=2.0)
    weight, bias = affine(normalized_shape)
    dy, dh = randn(shape, torch.float64, seed=5), randn(shape, torch.float64, seed=6)

    def unfused(x, r, w, b):
        h = x + r
        return F.layer_norm(h, normalized_shape, w, b), h

    y, h, cache = add_layer_norm_reference(x.numpy(), residual.numpy(), normalized_shape, weight.numpy(), bias.numpy())
    (expected_y, expected_h), grads = autograd(unfused, [x, residual, weight, bias], [dy, dh])
    assert_numpy_close(y, expected_y, "y")
    assert_numpy_close(h, expected_h, "h")
    for name, ours, theirs in zip(("dx", "dresidual", "dweight", "dbias"), add_layer_norm_reference_backward(dy.numpy(), dh.numpy(), cache, weight.numpy()), grads):
        assert_numpy_close(ours, theirs, name)


def test_add_rms_norm_reference():
    shape, normalized_shape = (3, 4, 6), (6,)
    x, residual = randn(shape, torch.float64, seed=1), randn(shape, torch.float64, seed=2, shift=2.0)
    weight, _ = affine(normalized_shape)
    dy = randn(shape, torch.float64, seed=5)

    def unfused(x, r, w):
        h = x + r
        return F.rms_norm(h, normalized_shape, w, 1e-6), h

    y, h, cache = add_rms_norm_reference(x.numpy(), residual.numpy(), normalized_shape, weight.numpy(), 1e-6)
    # No gradient arrives on h here (dh=None): only the norm's path.
    (expected_y, expected_h), grads = autograd(unfused, [x, residual, weight], [dy, torch.zeros(shape)])
    assert_numpy_close(y, expected_y, "y")
    assert_numpy_close(h, expected_h, "h")
    for name, ours, theirs in zip(("dx", "dresidual", "dweight"), add_rms_norm_reference_backward(dy.numpy(), None, cache, weight.numpy()), grads):
        assert_numpy_close(ours, theirs, name)


# ---------------------------------------------------------------------------------------------
# Channel-wise norms
# ---------------------------------------------------------------------------------------------

CHANNEL_SHAPES = [(6, 3), (4, 3, 5), (2, 3, 4, 5)]


@pytest.mark.parametrize("mode", ["train", "train_without_running_stats", "eval"])
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
def test_batch_norm_reference(shape, mode):
    channels = shape[1]
    x = randn(shape, torch.float64, scale=3.0, shift=1.0)
    weight, bias = affine((channels,))
    dy = randn(shape, torch.float64, seed=5)
    training = mode != "eval"
    running = None, None
    if mode != "train_without_running_stats":
        running = randn((channels,), torch.float64, seed=8), randn((channels,), torch.float64, seed=9).abs() + 0.5
    numpy_running = [None if t is None else t.numpy().copy() for t in running]  # copies: torch updates in place
    y, cache = batch_norm_reference(x.numpy(), *numpy_running, weight.numpy(), bias.numpy(), training, 0.3, 1e-5)
    (expected_y,), (dx, dw, db) = autograd(lambda x, w, b: F.batch_norm(x, *running, w, b, training, 0.3, 1e-5), [x, weight, bias], [dy])
    assert_numpy_close(y, expected_y, "y")
    if running[0] is not None:  # torch updated its copies in place; the reference returned new ones
        assert_numpy_close(cache.running_mean, running[0].numpy(), "running_mean")
        assert_numpy_close(cache.running_var, running[1].numpy(), "running_var")
        assert np.array_equal(numpy_running[0], running[0].numpy()) == (not training), "running_mean moved in eval"
    ref_dx, ref_dw, ref_db = batch_norm_reference_backward(dy.numpy(), cache, weight.numpy())
    assert_numpy_close(ref_dx, dx, "dx")
    assert_numpy_close(ref_dw, dw, "dweight")
    assert_numpy_close(ref_db, db, "dbias")


@pytest.mark.parametrize("num_groups", [1, 2, 6])
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 3, 4)])
def test_group_norm_reference(shape, num_groups):
    x = randn(shape, torch.float64, scale=3.0, shift=1.0)
    weight, bias = affine((shape[1],))
    dy = randn(shape, torch.float64, seed=5)
    y, cache = group_norm_reference(x.numpy(), num_groups, weight.numpy(), bias.numpy(), 1e-5)
    (expected_y,), (dx, dw, db) = autograd(lambda x, w, b: F.group_norm(x, num_groups, w, b, 1e-5), [x, weight, bias], [dy])
    assert_numpy_close(y, expected_y, "y")
    for name, ours, theirs in zip(("dx", "dweight", "dbias"), group_norm_reference_backward(dy.numpy(), cache, weight.numpy()), (dx, dw, db)):
        assert_numpy_close(ours, theirs, name)


@pytest.mark.parametrize("mode", ["input_stats", "input_stats_updating_running", "running_stats"])
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 3, 4, 5)])
def test_instance_norm_reference(shape, mode):
    channels = shape[1]
    x = randn(shape, torch.float64, scale=3.0, shift=1.0)
    weight, bias = affine((channels,))
    dy = randn(shape, torch.float64, seed=5)
    use_input_stats = mode != "running_stats"
    running = None, None
    if mode != "input_stats":
        running = randn((channels,), torch.float64, seed=8), randn((channels,), torch.float64, seed=9).abs() + 0.5
    numpy_running = [None if t is None else t.numpy().copy() for t in running]  # copies: torch updates in place
    y, cache = instance_norm_reference(x.numpy(), *numpy_running, weight.numpy(), bias.numpy(), use_input_stats, 0.3, 1e-5)
    (expected_y,), grads = autograd(
        lambda x, w, b: F.instance_norm(x, *running, w, b, use_input_stats, 0.3, 1e-5), [x, weight, bias], [dy]
    )
    assert_numpy_close(y, expected_y, "y")
    if running[0] is not None:
        assert_numpy_close(cache.running_mean, running[0].numpy(), "running_mean")
        assert_numpy_close(cache.running_var, running[1].numpy(), "running_var")
    for name, ours, theirs in zip(("dx", "dweight", "dbias"), instance_norm_reference_backward(dy.numpy(), cache, weight.numpy()), grads):
        assert_numpy_close(ours, theirs, name)


# ---------------------------------------------------------------------------------------------
# normlib's ops in every dtype against the references
# ---------------------------------------------------------------------------------------------


def ops_and_references(x, weight, bias):
    """(normlib op on x, the reference's y on the same values) for each norm; x is (N, C, L)."""
    c, length = x.shape[1], x.shape[2]
    wc, bc, wl, bl = weight[:c], bias[:c], weight[:length], bias[:length]
    x64 = to_numpy(x)
    return {
        "layer_norm": (normlib.layer_norm(x, (length,), wl, bl), layer_norm_reference(x64, (length,), to_numpy(wl), to_numpy(bl))[0]),
        # torch picks eps = finfo(float32).eps for fp16/bf16/fp32 and finfo(float64).eps for fp64
        "rms_norm": (normlib.rms_norm(x, (length,), wl), rms_norm_reference(x64, (length,), to_numpy(wl), RMS_NORM_DEFAULT_EPS[x.dtype])[0]),
        "batch_norm": (normlib.batch_norm(x, None, None, wc, bc, True), batch_norm_reference(x64, None, None, to_numpy(wc), to_numpy(bc), True)[0]),
        "group_norm": (normlib.group_norm(x, 2, wc, bc), group_norm_reference(x64, 2, to_numpy(wc), to_numpy(bc))[0]),
        "instance_norm": (normlib.instance_norm(x, None, None, wc, bc), instance_norm_reference(x64, None, None, to_numpy(wc), to_numpy(bc))[0]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_match_references_in_every_dtype(dtype):
    x = randn((4, 6, 37), dtype, scale=2.0, shift=1.0)
    weight = randn((37,), dtype, seed=3, scale=0.5, shift=1.0)
    bias = randn((37,), dtype, seed=4)
    for name, (actual, reference) in ops_and_references(x, weight, bias).items():
        assert actual.dtype == dtype, f"{name} returned {actual.dtype} for {dtype} input"
        assert_close_to_reference(actual, reference, dtype, f"{name} in {dtype}")
