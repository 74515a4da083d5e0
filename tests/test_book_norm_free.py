"""The plumbing of the chapter on training without normalization (normlib/book/norm_free.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlib
from normlib.book.norm_free import (
    CNN_NORMS,
    ResidualCNN,
    attach_agc,
    layer_norm_io,
    set_dyt_alpha,
    tail_to_centre_slope,
)
from normlib.book.transformer import TinyTransformer
from normlib.norm_free import ScaledWSConv2d, SkipInit, unitwise_norm

DIGITS = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", CNN_NORMS)
def test_residual_cnn_gives_logits_and_has_the_layers_its_norm_asks_for(norm):
    torch.manual_seed(0)
    model = ResidualCNN(norm, width=8, blocks=3)
    assert model(DIGITS).shape == (6, 10)
    kinds = {type(m) for m in model.modules()}
    assert (normlib.BatchNorm2d in kinds) == (norm == "batch")
    assert (SkipInit in kinds) == (norm == "skipinit")
    assert (ScaledWSConv2d in kinds) == (norm == "nf")


def test_skipinit_network_starts_as_its_stem():
    torch.manual_seed(0)
    model = ResidualCNN("skipinit", width=8, blocks=5)
    stem = model.stem(DIGITS)
    torch.testing.assert_close(model.blocks(stem), stem)


def test_nf_blocks_track_the_growing_variance_of_the_residual_stream():
    model = ResidualCNN("nf", width=8, blocks=4)
    stds = [block.expected_std for block in model.blocks]
    np.testing.assert_allclose(np.square(stds), 1 + 0.04 * np.arange(4))
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        ResidualCNN("layer")
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        ResidualCNN("batch", blocks=0)


def test_attach_agc_clips_before_the_step_and_leaves_excluded_parameters_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    handles = attach_agc(model, 0.01, exclude=model[1].parameters())
    assert len(handles) == 2
    model(torch.randn(8, 4)).mul(1e3).sum().backward()
    ratio = unitwise_norm(model[0].weight.grad) / unitwise_norm(model[0].weight)
    assert ratio.max().item() <= 0.01 * (1 + 1e-5)
    head_ratio = unitwise_norm(model[1].weight.grad) / unitwise_norm(model[1].weight)
    assert head_ratio.max().item() > 0.01  # not clipped
    for handle in handles:
        handle.remove()


def test_layer_norm_io_returns_every_layer_norm_input_and_normalized_output():
    torch.manual_seed(0)
    model = TinyTransformer(n_layer=2, norm="layer", placement="pre")
    tokens = torch.randint(0, 10, (3, 8))
    records = layer_norm_io(model, tokens)
    assert [name for name, _, _ in records] == [
        "blocks.0.norm_1", "blocks.0.norm_2", "blocks.1.norm_1", "blocks.1.norm_2", "norm_f"
    ]
    for _name, x, x_hat in records:
        assert x.shape == x_hat.shape == (24, 32)
        np.testing.assert_allclose(x_hat.mean(axis=1), 0, atol=1e-12)
        np.testing.assert_allclose(x_hat, (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5))
    assert model.training  # restored


def test_tail_to_centre_slope_is_one_for_a_line_and_below_one_for_tanh():
    x = np.linspace(-4, 4, 401)
    assert tail_to_centre_slope(x, 3 * x - 1) == pytest.approx(1.0)
    assert tail_to_centre_slope(x, np.tanh(x)) < 0.5
    with pytest.raises(ValueError, match="same number"):
        tail_to_centre_slope(x, x[:-1])
    with pytest.raises(ValueError, match="quantile"):
        tail_to_centre_slope(x, x, quantile=0.3)


def test_set_dyt_alpha_sets_every_alpha_and_refuses_a_model_without_dyt():
    model = TinyTransformer(n_layer=2, norm="dyt")
    set_dyt_alpha(model, 2.0)
    alphas = [m.alpha.item() for m in model.modules() if isinstance(m, normlib.DyT)]
    assert alphas == [2.0] * 5
    with pytest.raises(ValueError, match="no normlib.DyT"):
        set_dyt_alpha(TinyTransformer(norm="layer"), 2.0)
