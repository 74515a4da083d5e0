"""The normalization-free pieces: SkipInit, Scaled Weight Standardization and unit-wise AGC."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normlib
from normlib.norm_free import RELU_GAMMA, ScaledWSConv2d, SkipInit, adaptive_grad_clip, unitwise_norm


def test_relu_gamma_restores_unit_variance_after_a_relu():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs((RELU_GAMMA * torch.relu(z)).var().item() - 1.0) < 0.01
    assert RELU_GAMMA == pytest.approx(1.7129, abs=1e-4)  # the authors estimate 1.7140 by sampling


def test_skipinit_starts_as_zero_and_learns():
    skip = SkipInit()
    x = torch.randn(3, 4)
    assert torch.equal(skip(x), torch.zeros(3, 4))
    skip(x).mul(x).sum().backward()
    torch.testing.assert_close(skip.gain.grad, (x * x).sum())
    assert SkipInit(0.5)(x).equal(0.5 * x)
    assert repr(SkipInit()) == "SkipInit(init=0.0)"
    with pytest.raises(ValueError, match="init must be a finite number"):
        SkipInit(float("inf"))


def test_skipinit_block_is_the_identity_at_initialization():
    branch = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), SkipInit())
    x = torch.randn(5, 8)
    assert torch.equal(x + branch(x), x)


def test_scaled_ws_weight_has_zero_mean_and_unit_norm_per_output_channel():
    conv = ScaledWSConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(2.0)  # any scale and shift of the raw weight
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.square().sum(dim=(1, 2, 3)), torch.ones(5), rtol=1e-4, atol=0)
    gained = ScaledWSConv2d(3, 5, 3, gamma=RELU_GAMMA)
    with torch.no_grad():
        gained.weight.copy_(conv.weight)
        gained.gain.fill_(2.0)
    torch.testing.assert_close(
        gained.standardized_weight().square().sum(dim=(1, 2, 3)), torch.full((5,), (2 * RELU_GAMMA) ** 2), rtol=1e-4, atol=0
    )


def test_scaled_ws_preserves_unit_variance_of_a_white_input():
    # mean-0, norm-1 rows: a unit-variance input with independent entries gives unit-variance outputs
    torch.manual_seed(0)
    conv = ScaledWSConv2d(16, 16, 3, padding=1, bias=False)
    x = torch.randn(64, 16, 12, 12)
    y = conv(x)[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert abs(y.var().item() - 1.0) < 0.1
    plain = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    plain.weight.data.copy_(conv.weight.data)
    assert plain(x).var().item() < 0.5  # PyTorch's default init shrinks the signal instead


def test_scaled_ws_forward_is_a_conv_with_the_standardized_weight_and_gradients_reach_the_gain():
    conv = ScaledWSConv2d(2, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 7, 7)
    expected = nn.functional.conv2d(x, conv.standardized_weight(), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected)
    conv(x).square().sum().backward()
    assert conv.gain.grad is not None and conv.weight.grad is not None
    assert ScaledWSConv2d(2, 4, 3, gain=False).gain is None
    assert "gamma=1.713" in repr(ScaledWSConv2d(2, 4, 3, gamma=RELU_GAMMA))


def test_scaled_ws_gradcheck_float64():
    conv = ScaledWSConv2d(2, 3, 3, dtype=torch.float64)
    inputs = (
        torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True),
        conv.weight.detach().clone().requires_grad_(),
        torch.rand(3, 1, 1, 1, dtype=torch.float64).add(0.5).requires_grad_(),
    )

    def forward(x, weight, gain):
        return torch.func.functional_call(conv, {"weight": weight, "gain": gain, "bias": conv.bias}, (x,))

    assert torch.autograd.gradcheck(forward, inputs)


@pytest.mark.parametrize("kwargs,message", [(dict(gamma=0.0), "gamma must be a positive number"), (dict(eps=-1.0), "eps must be a non-negative")])
def test_scaled_ws_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaledWSConv2d(2, 3, 3, **kwargs)


def test_unitwise_norm_of_matrices_convolutions_and_vectors():
    torch.testing.assert_close(unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])), torch.tensor([[5.0], [1.0]]))
    assert unitwise_norm(torch.ones(2, 3, 2, 2)).shape == (2, 1, 1, 1)
    torch.testing.assert_close(unitwise_norm(torch.tensor([3.0, 4.0])), torch.tensor(5.0))


def test_agc_clips_only_the_units_whose_gradient_is_large_relative_to_their_weight():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0], [3.0, 4.0]]))  # both rows of norm 5
    weight.grad = torch.tensor([[0.0, 1.0], [0.0, 0.01]])  # ratios 0.2 and 0.002
    adaptive_grad_clip([weight], clipping=0.01)
    torch.testing.assert_close(weight.grad, torch.tensor([[0.0, 0.05], [0.0, 0.01]]))  # row 0 to 0.01 * 5


def test_agc_uses_eps_for_zero_weights_and_skips_parameters_without_gradients():
    gain = nn.Parameter(torch.zeros(()))
    gain.grad = torch.tensor(1.0)
    frozen = nn.Parameter(torch.ones(3))
    adaptive_grad_clip([gain, frozen], clipping=0.1, eps=1e-3)
    torch.testing.assert_close(gain.grad, torch.tensor(1e-4))  # 0.1 * max(0, 1e-3)
    assert frozen.grad is None


def test_agc_accepts_a_single_tensor_and_a_module_s_parameters():
    conv = nn.Conv2d(2, 3, 3)
    conv(torch.randn(2, 2, 5, 5)).mul(1e4).sum().backward()
    adaptive_grad_clip(conv.weight, clipping=0.01)
    ratio = unitwise_norm(conv.weight.grad) / unitwise_norm(conv.weight)
    assert ratio.max().item() <= 0.01 * (1 + 1e-5)
    adaptive_grad_clip(conv.parameters())
    assert unitwise_norm(conv.bias.grad).item() <= 0.01 * unitwise_norm(conv.bias).item() * (1 + 1e-5)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(clipping=0.0), ValueError, "clipping must be a positive number"),
        (dict(clipping=math.nan), ValueError, "clipping must be a positive number"),
        (dict(eps=-1.0), ValueError, "eps must be a non-negative number"),
    ],
)
def test_agc_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        adaptive_grad_clip([nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(TypeError, match="parameters must be tensors"):
        adaptive_grad_clip([1.0])


def test_exported_from_normlib():
    assert normlib.ScaledWSConv2d is ScaledWSConv2d and normlib.SkipInit is SkipInit
    assert normlib.adaptive_grad_clip is adaptive_grad_clip
