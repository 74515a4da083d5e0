"""Batch Renormalization: reference, functional op, module, schedule, gradients and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlib
from normlib.batch_renorm import (
    BatchRenorm2d,
    batch_renorm,
    batch_renorm_reference,
    batch_renorm_reference_backward,
)
from normlib.batch_norm import batch_norm_reference

TOLERANCE = {  # (atol, rtol) for outputs of order 1, per dtype
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
SHAPES = [(4, 3, 5, 7), (2, 5, 1, 9), (3, 2, 11), (6, 4)]


def make_case(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (1.5 * torch.randn(*shape, generator=g, dtype=torch.float64) + 0.7).to(dtype)
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    running_mean = 0.3 * torch.randn(channels, generator=g, dtype=torch.float64)
    running_var = torch.rand(channels, generator=g, dtype=torch.float64) + 1.0
    return x, weight, bias, running_mean, running_var


def test_reference_against_a_hand_computation():
    # one channel, values 0 and 2: mean_B = 1, var_B = 1; running mean 0, var 4 (sigma = 2, eps 0)
    x = np.array([[0.0], [2.0]])  # (N=2, C=1)
    y, cache = batch_renorm_reference(x, np.zeros(1), np.full(1, 4.0), training=True, eps=0.0,
                                      momentum=0.5, r_max=3.0, d_max=5.0)
    # r = sigma_B / sigma = 1/2, d = (1 - 0)/2 = 1/2, x_hat = -1, 1 -> y = -1/2 + 1/2, 1/2 + 1/2
    np.testing.assert_allclose(cache.r, [0.5])
    np.testing.assert_allclose(cache.d, [0.5])
    np.testing.assert_allclose(y, [[0.0], [1.0]])
    # which is (x - running_mean) / sigma: training output equals inference output
    np.testing.assert_allclose(y, x / 2.0)
    np.testing.assert_allclose(cache.running_mean, [0.5])  # 0.5 * 0 + 0.5 * 1
    np.testing.assert_allclose(cache.running_var, [3.0])  # 0.5 * 4 + 0.5 * (unbiased var 2)


def test_reference_clips_r_and_d():
    x = np.array([[0.0], [20.0]])  # sigma_B = 10, mean_B = 10 against sigma = 1, mean 0
    _, cache = batch_renorm_reference(x, np.zeros(1), np.ones(1), training=True, eps=0.0,
                                      r_max=3.0, d_max=5.0)
    np.testing.assert_allclose(cache.r, [3.0])
    np.testing.assert_allclose(cache.d, [5.0])


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_with_no_correction_is_batch_norm(shape):
    x, weight, bias, rm, rv = (t.numpy() for t in make_case(shape))
    for training in (True, False):
        ours, cache = batch_renorm_reference(x, rm, rv, weight, bias, training, 0.1, 1e-5, r_max=1.0, d_max=0.0)
        bn, bn_cache = batch_norm_reference(x, rm, rv, weight, bias, training, 0.1, 1e-5)
        np.testing.assert_allclose(ours, bn, atol=1e-12)
        np.testing.assert_allclose(cache.running_mean, bn_cache.running_mean, atol=1e-12)
        np.testing.assert_allclose(cache.running_var, bn_cache.running_var, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_unclipped_training_output_equals_the_inference_output(shape):
    x, weight, bias, rm, rv = (t.numpy() for t in make_case(shape))
    train, _ = batch_renorm_reference(x, rm, rv, weight, bias, True, 0.1, 1e-5, r_max=100.0, d_max=100.0)
    infer, _ = batch_renorm_reference(x, rm, rv, weight, bias, False, 0.1, 1e-5)
    np.testing.assert_allclose(train, infer, atol=1e-10)


def test_reference_backward_against_finite_differences_with_r_and_d_held():
    # r and d are constants for the gradient. Where both are clipped they do not move under a
    # small change of x, so finite differences measure exactly the gradient the formula gives.
    x, weight, bias, rm, rv = (t.numpy() for t in make_case((5, 3, 2, 2), seed=3))
    rv = rv * 100.0  # sigma_B / sigma << 1/r_max: r clipped to 1/r_max
    rm = rm - 50.0  # (mean_B - running_mean) / sigma >> d_max: d clipped to d_max
    kwargs = dict(training=True, momentum=0.1, eps=1e-5, r_max=2.0, d_max=1.5)
    y, cache = batch_renorm_reference(x, rm, rv, weight, bias, **kwargs)
    np.testing.assert_allclose(cache.r, 0.5)
    np.testing.assert_allclose(cache.d, 1.5)
    dy = np.random.default_rng(0).standard_normal(y.shape)
    dx, dweight, dbias = batch_renorm_reference_backward(dy, cache, weight)
    step = 1e-6
    for index in [(0, 0, 0, 0), (3, 1, 1, 0), (4, 2, 0, 1)]:
        bumped = x.copy()
        bumped[index] += step
        y_plus, _ = batch_renorm_reference(bumped, rm, rv, weight, bias, **kwargs)
        bumped[index] -= 2 * step
        y_minus, _ = batch_renorm_reference(bumped, rm, rv, weight, bias, **kwargs)
        numeric = ((y_plus - y_minus) * dy).sum() / (2 * step)
        assert abs(numeric - dx[index]) < 1e-6
    np.testing.assert_allclose(dbias, dy.sum(axis=(0, 2, 3)))
    np.testing.assert_allclose(dweight, (dy * (cache.x_hat * 0.5 + 1.5)).sum(axis=(0, 2, 3)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_op_against_the_reference(shape, dtype, training):
    x64, weight, bias, rm, rv = make_case(shape, seed=1)
    expected, cache = batch_renorm_reference(x64.numpy(), rm.numpy(), rv.numpy(), weight.numpy(), bias.numpy(),
                                             training, 0.1, 1e-5, r_max=1.5, d_max=0.5)
    x = x64.to(dtype)
    running_mean, running_var = rm.float(), rv.float()
    y = batch_renorm(x, running_mean, running_var, weight.to(dtype), bias.to(dtype), training, 0.1, 1e-5, 1.5, 0.5)
    assert y.dtype == dtype
    # the reference on the rounded input, so that only the op's own rounding is measured
    expected, cache = batch_renorm_reference(x.double().numpy(), rm.numpy(), rv.numpy(),
                                             weight.to(dtype).double().numpy(), bias.to(dtype).double().numpy(),
                                             training, 0.1, 1e-5, r_max=1.5, d_max=0.5)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), torch.from_numpy(expected), atol=atol, rtol=rtol)
    torch.testing.assert_close(running_mean.double(), torch.from_numpy(cache.running_mean), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(running_var.double(), torch.from_numpy(cache.running_var), atol=1e-5, rtol=1e-5)


def test_op_backward_against_the_reference():
    x, weight, bias, rm, rv = make_case((4, 3, 3, 5), seed=2)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = batch_renorm(x, rm.clone(), rv.clone(), weight, bias, True, 0.1, 1e-5, 1.2, 0.3)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, cache = batch_renorm_reference(x.detach().numpy(), rm.numpy(), rv.numpy(), weight.detach().numpy(),
                                      bias.detach().numpy(), True, 0.1, 1e-5, r_max=1.2, d_max=0.3)
    dx, dweight, dbias = batch_renorm_reference_backward(dy.numpy(), cache, weight.detach().numpy())
    torch.testing.assert_close(x.grad, torch.from_numpy(dx))
    torch.testing.assert_close(weight.grad, torch.from_numpy(dweight))
    torch.testing.assert_close(bias.grad, torch.from_numpy(dbias))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(training):
    # In training, finite differences see r and d move with x unless they are clipped; a large
    # running variance and a distant running mean clip both, so that the analytic gradient (r, d
    # held constant) is the true derivative and gradcheck can compare them.
    x, weight, bias, rm, rv = make_case((3, 2, 2, 3), seed=4)
    rm, rv = rm - 40.0, rv * 400.0
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias))

    def op(x, weight, bias):
        return batch_renorm(x, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5, 2.0, 1.0)

    assert torch.autograd.gradcheck(op, inputs)


def test_gradcheck_float64_as_batch_norm():
    x, weight, bias, rm, rv = make_case((3, 2, 2, 3), seed=5)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias))

    def op(x, weight, bias):
        return batch_renorm(x, rm.clone(), rv.clone(), weight, bias, True, 0.1, 1e-5, 1.0, 0.0)

    assert torch.autograd.gradcheck(op, inputs)


def test_module_with_no_correction_matches_torch_batch_norm():
    torch.manual_seed(0)
    ours = BatchRenorm2d(6, momentum=0.2, r_max=1.0, d_max=0.0)
    theirs = nn.BatchNorm2d(6, momentum=0.2)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 3) * 2 + step
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    ours.eval(), theirs.eval()
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))


def test_module_state_dict_loads_into_batch_norm_for_inference():
    torch.manual_seed(1)
    ours = BatchRenorm2d(4)
    for _ in range(5):
        ours(torch.randn(2, 4, 3, 3) * 3 + 1)
    theirs = nn.BatchNorm2d(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_module_gradients_flow_to_parameters():
    module = BatchRenorm2d(3)
    module(torch.randn(4, 3, 2, 2)).pow(2).sum().backward()
    assert module.weight.grad is not None and module.bias.grad is not None
    assert module.weight.grad.abs().sum() > 0


def test_schedule_warmup_then_linear_ramp():
    module = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    limits = []
    for _ in range(8):
        limits.append(module.current_limits())
        module(torch.randn(2, 2, 2, 2))
    assert limits[:2] == [(1.0, 0.0), (1.0, 0.0)]
    np.testing.assert_allclose([r for r, _ in limits[2:]], [1.0, 1.5, 2.0, 2.5, 3.0, 3.0])
    np.testing.assert_allclose([d for _, d in limits[2:]], [0.0, 1.25, 2.5, 3.75, 5.0, 5.0])
    module.eval()
    module(torch.randn(2, 2, 2, 2))
    assert int(module.num_batches_tracked) == 8  # evaluation does not advance the schedule


def test_schedule_survives_a_state_dict_round_trip():
    first = BatchRenorm2d(2, warmup_steps=1, ramp_steps=10)
    for _ in range(4):
        first(torch.randn(3, 2, 2, 2))
    second = BatchRenorm2d(2, warmup_steps=1, ramp_steps=10)
    second.load_state_dict(first.state_dict())
    assert second.current_limits() == first.current_limits() != (1.0, 0.0)


def test_module_in_evaluation_uses_running_statistics_only():
    module = BatchRenorm2d(3).eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(module(x)[:1], module(x[:1]))  # no dependence on the batch


def test_repr_names_the_limits():
    text = repr(BatchRenorm2d(8, r_max=2.0, d_max=1.0, warmup_steps=5))
    assert "r_max=2" in text and "d_max=1" in text and "warmup_steps=5" in text


def test_exported():
    assert normlib.BatchRenorm2d is BatchRenorm2d
    assert normlib.batch_renorm is batch_renorm


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r_max": 0.5}, "r_max must be a number >= 1"),
        ({"r_max": float("nan")}, "r_max must be a number >= 1"),
        ({"d_max": -1.0}, "d_max must be a number >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"ramp_steps": 2.5}, "ramp_steps must be an int >= 0"),
        ({"momentum": 1.5}, "momentum must be a number in"),
        ({"eps": -1e-5}, "eps must be a non-negative number"),
    ],
)
def test_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(4, **kwargs)


def test_module_bad_num_features():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        BatchRenorm2d(0)


def test_module_bad_input_shape():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C, H, W\)"):
        BatchRenorm2d(4)(torch.randn(2, 4, 3))


def test_op_bad_input():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        batch_renorm(torch.ones(2, 3, dtype=torch.long), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        batch_renorm(torch.randn(2, 3), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        batch_renorm(torch.randn(2, 3), torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="weight must have shape"):
        batch_renorm(torch.randn(2, 3), rm, rv, weight=torch.ones(2), training=True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_renorm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="r_max must be a number >= 1"):
        batch_renorm(torch.randn(2, 3), rm, rv, training=True, r_max=0.9)
