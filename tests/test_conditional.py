"""Conditional norms: FiLM, class-conditional BatchNorm and adaLN-Zero against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlib
from normlib.conditional import AdaLNZeroBlock, ConditionalBatchNorm2d, FiLM, film


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_film_formula():
    x, gamma, beta = randn(3, 4, 5, 2), randn(3, 4, seed=1), randn(3, 4, seed=2)
    y = film(x, gamma, beta)
    for n in range(3):
        for c in range(4):
            torch.testing.assert_close(y[n, c], gamma[n, c] * x[n, c] + beta[n, c])


def test_film_on_flat_features():
    x, gamma, beta = randn(3, 4), randn(3, 4, seed=1), randn(3, 4, seed=2)
    torch.testing.assert_close(film(x, gamma, beta), gamma * x + beta)


def test_film_module_uses_its_generator():
    torch.manual_seed(0)
    layer = FiLM(4, 3).double()
    x, cond = randn(2, 4, 3, 3), randn(2, 3, seed=1)
    delta_gamma, beta = layer.generator(cond).chunk(2, dim=1)
    expected = (1 + delta_gamma)[:, :, None, None] * x + beta[:, :, None, None]
    torch.testing.assert_close(layer(x, cond), expected)


def test_film_with_zero_generator_is_the_identity():
    layer = FiLM(4, 3)
    nn.init.zeros_(layer.generator.weight)
    nn.init.zeros_(layer.generator.bias)
    x = randn(2, 4, 3, 3, dtype=torch.float32)
    assert torch.equal(layer(x, torch.randn(2, 3)), x)


def test_film_gradcheck_float64():
    layer = FiLM(3, 2).double()
    x = randn(2, 3, 2, 2).requires_grad_(True)
    cond = randn(2, 2, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (x, cond))


def test_conditional_batch_norm_formula_and_buffers():
    torch.manual_seed(0)
    layer = ConditionalBatchNorm2d(3, num_classes=4).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x, labels = randn(5, 3, 4, 4), torch.tensor([0, 3, 3, 1, 2])
    y = layer(x, labels)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + 1e-5)
    expected = layer.weight[labels][:, :, None, None] * x_hat + layer.bias[labels][:, :, None, None]
    torch.testing.assert_close(y, expected)
    # the statistics are BatchNorm's: same buffers, same running averages as nn.BatchNorm2d
    reference = nn.BatchNorm2d(3, affine=False).double()
    reference(x)
    torch.testing.assert_close(layer.norm.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.norm.running_var, reference.running_var)
    layer.eval()
    assert torch.equal(layer(x[:1], labels[:1]), layer(x, labels)[:1])  # eval: no batch dependence


def test_conditional_batch_norm_is_film_with_a_one_hot_condition():
    torch.manual_seed(1)
    cbn = ConditionalBatchNorm2d(3, num_classes=5).double()
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.normal_()
    layer = FiLM(3, 5).double()
    with torch.no_grad():  # generator(one_hot(k)) = (gamma[k] - 1, beta[k])
        layer.generator.weight.copy_(torch.cat([cbn.weight.T - 1, cbn.bias.T]))
        layer.generator.bias.zero_()
    x, labels = randn(6, 3, 2, 2), torch.tensor([0, 1, 4, 4, 2, 3])
    via_film = layer(normlib.batch_norm(x, None, None, training=True), nn.functional.one_hot(labels, 5).double())
    torch.testing.assert_close(cbn(x, labels), via_film)


def test_conditional_batch_norm_starts_as_batch_norm():
    layer = ConditionalBatchNorm2d(3, num_classes=4)
    x = randn(4, 3, 2, 2, dtype=torch.float32)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, 2, 3])), nn.BatchNorm2d(3)(x))


def test_conditional_batch_norm_gradients_reach_only_the_used_rows():
    layer = ConditionalBatchNorm2d(2, num_classes=3)
    layer(randn(4, 2, 2, 2, dtype=torch.float32), torch.tensor([0, 0, 2, 2])).pow(3).sum().backward()
    assert layer.weight.grad[1].abs().sum() == 0 and layer.weight.grad[0].abs().sum() > 0


def make_adaln_block(channels=4, cond=3):
    sublayer = nn.Conv2d(channels, channels, 3, padding=1)
    return AdaLNZeroBlock(sublayer, channels, cond)


def test_adaln_zero_block_is_the_identity_at_initialization():
    torch.manual_seed(0)
    block = make_adaln_block()
    x, cond = randn(2, 4, 5, 5, dtype=torch.float32), torch.randn(2, 3)
    assert torch.equal(block(x, cond), x)


def test_adaln_zero_block_formula_once_trained():
    torch.manual_seed(0)
    block = make_adaln_block().double()
    with torch.no_grad():
        block.modulation[1].weight.normal_()
        block.modulation[1].bias.normal_()
    x, cond = randn(2, 4, 5, 5), randn(2, 3, seed=1)
    shift, scale, gate = block.modulation[1](nn.functional.silu(cond)).chunk(3, dim=1)
    mean = x.mean(dim=1, keepdim=True)  # LayerNorm over the channels at each position
    var = x.var(dim=1, unbiased=False, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-6)
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = x + gate[:, :, None, None] * block.sublayer(h)
    torch.testing.assert_close(block(x, cond), expected)
    assert not torch.allclose(block(x, cond), x)


def test_adaln_zero_gate_receives_gradient_at_initialization():
    # the gate starts at 0, but its gradient (the sublayer's output) does not: training moves it
    block = make_adaln_block()
    block(torch.randn(2, 4, 3, 3), torch.randn(2, 3)).square().sum().backward()
    assert block.modulation[1].weight.grad.abs().sum() > 0
    assert block.sublayer.weight.grad.abs().sum() == 0  # multiplied by a zero gate


def test_adaln_zero_gradcheck_float64():
    torch.manual_seed(0)
    block = make_adaln_block(channels=3, cond=2).double()
    with torch.no_grad():
        block.modulation[1].weight.normal_()
        block.modulation[1].bias.normal_()
    x = randn(2, 3, 2, 2).requires_grad_(True)
    cond = randn(2, 2, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(block, (x, cond))


def test_exported():
    assert normlib.FiLM is FiLM and normlib.film is film
    assert normlib.ConditionalBatchNorm2d is ConditionalBatchNorm2d
    assert normlib.AdaLNZeroBlock is AdaLNZeroBlock


def test_bad_input():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        FiLM(0, 3)
    with pytest.raises(ValueError, match="cond_features must be a positive int"):
        make_adaln_block(cond=0)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ConditionalBatchNorm2d(3, num_classes=0)
    with pytest.raises(TypeError, match="sublayer must be an nn.Module"):
        AdaLNZeroBlock(lambda h: h, 4, 3)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4, \*spatial\)"):
        FiLM(4, 3)(torch.randn(2, 5, 3, 3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="input must be a floating-point"):
        FiLM(4, 3)(torch.ones(2, 4, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"cond must have shape \(N, D\) = \(2, 3\)"):
        FiLM(4, 3)(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"cond must have shape \(N, D\) = \(2, 3\)"):
        make_adaln_block()(torch.randn(2, 4, 3, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"gamma must have shape \(N, C\)"):
        film(torch.randn(2, 4, 3), torch.randn(4), torch.randn(2, 4))
    layer = ConditionalBatchNorm2d(3, num_classes=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        layer(torch.randn(2, 3, 2, 2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="labels must be a long tensor of shape"):
        layer(torch.randn(2, 3, 2, 2), torch.tensor([0.0, 1.0]))
