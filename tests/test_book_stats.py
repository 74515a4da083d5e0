"""normlib.book.stats measures what it says, and measuring leaves the model unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlib.book.stats import layer_outputs, layer_statistics


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Linear(4, 3), nn.ReLU(),
        nn.Linear(3, 2),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def test_statistics_match_a_hand_computation():
    model, (x, y) = small_model(), batch()
    measured = layer_statistics(model, x, y)

    # the same quantities, computed step by step with autograd on a copy of the model
    reference = small_model()
    h1 = reference[2](reference[1](reference[0](x)))
    h2 = reference[4](reference[3](h1))
    loss = nn.functional.cross_entropy(reference[5](h2), y)
    grads = torch.autograd.grad(loss, [h1, h2, reference[0].weight, reference[3].weight, reference[5].weight])

    np.testing.assert_allclose(measured.activation_mean, [h1.mean().item(), h2.mean().item()], rtol=1e-6)
    np.testing.assert_allclose(measured.activation_std, [h1.std().item(), h2.std().item()], rtol=1e-6)
    np.testing.assert_allclose(measured.activation_grad_norm, [g.norm().item() for g in grads[:2]], rtol=1e-5)
    np.testing.assert_allclose(measured.weight_grad_norm, [g.norm().item() for g in grads[2:]], rtol=1e-5)
    assert measured.loss == pytest.approx(loss.item(), rel=1e-6)


def test_measuring_changes_neither_buffers_nor_grads_nor_mode():
    model, (x, y) = small_model(), batch()
    buffers_before = {name: b.clone() for name, b in model.named_buffers()}
    layer_statistics(model, x, y)
    layer_outputs(model, x)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name]), f"buffer {name} changed"
    assert all(p.grad is None for p in model.parameters()), "measuring must not fill .grad"
    assert model.training


def test_layer_outputs_in_depth_order():
    model, (x, _) = small_model(), batch()
    model.eval()
    outputs = layer_outputs(model, x)
    assert [tuple(o.shape) for o in outputs] == [(8, 4), (8, 3)]
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
    torch.testing.assert_close(outputs[0], expected)


def test_bad_arguments_are_named():
    model, (x, y) = small_model(), batch()
    with pytest.raises(ValueError, match="x must be a batch"):
        layer_statistics(model, x, y[:3])
    with pytest.raises(ValueError, match="watch="):
        layer_statistics(model, x, y, watch=nn.Conv2d)
    with pytest.raises(ValueError, match="weights_of="):
        layer_statistics(model, x, y, weights_of=nn.Conv2d)
    with pytest.raises(ValueError, match="watch="):
        layer_outputs(model, x, watch=nn.Conv2d)
