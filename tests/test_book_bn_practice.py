"""Plumbing of the section "BatchNorm in practice"."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import normlib
from normlib.book.bn_practice import (
    GhostBatchRenorm2d,
    ResidualCNN,
    fold_batch_norms,
    precise_batch_norm,
    same_class_pairs,
    set_bn_mode,
    train_steps,
    with_ghost_renorm,
    with_torch_batch_norm,
)
from normlib.book.data import Split
from normlib.book.models import SmallCNN


def tiny_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 4
    return Split(x, y, x[:16], y[:16])


def trained_small_cnn(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(norm="batch", width=4)
    train_steps(model, tiny_split(), epochs=1, batch_size=16, lr=0.05, seed=seed)
    return model


@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
def test_bn_modes_hold_during_training(mode):
    model = trained_small_cnn()
    bn = model.features[1]
    before = (bn.running_mean.clone(), bn.weight.detach().clone())
    train_steps(model, tiny_split(seed=1), epochs=1, batch_size=4, lr=0.05, seed=0, bn_mode=mode)
    stats_moved = not torch.equal(before[0], bn.running_mean)
    gamma_moved = not torch.equal(before[1], bn.weight.detach())
    assert stats_moved == (mode == "train")
    assert gamma_moved == (mode != "frozen")
    assert bn.training == (mode == "train")


def test_set_bn_mode_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        set_bn_mode(SmallCNN(), "fixed")


def test_same_class_pairs():
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 1])
    order = same_class_pairs(labels, torch.Generator().manual_seed(0))
    pairs = order.view(-1, 2)
    assert len(order) == 8 and len(set(order.tolist())) == 8  # the odd 0 is left out
    assert all(labels[a] == labels[b] for a, b in pairs.tolist())


def test_fold_batch_norms_is_exact_and_removes_the_layers():
    model = trained_small_cnn().eval()
    folded = fold_batch_norms(model)
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, (normlib.BatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
    assert any(isinstance(m, normlib.BatchNorm2d) for m in model.modules())  # original untouched


def test_fold_batch_norms_in_a_residual_network():
    torch.manual_seed(0)
    model = ResidualCNN(2, width=4)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 1, 8, 8))  # running statistics away from their start
    model.eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fold_batch_norms(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_precise_batch_norm_matches_update_bn_and_restores_momentum():
    model = trained_small_cnn()
    x = torch.rand(48, 1, 8, 8)
    ours = precise_batch_norm(copy.deepcopy(model), x, batch_size=16)
    theirs = with_torch_batch_norm(model)
    update_bn([x[i : i + 16] for i in range(0, 48, 16)], theirs)
    pairs = [(a, b) for a, b in zip(ours.modules(), theirs.modules()) if isinstance(b, nn.BatchNorm2d)]
    assert len(pairs) == 2
    for a, b in pairs:
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert a.momentum == 0.1
    assert not ours.training


def test_with_torch_batch_norm_keeps_the_function():
    model = trained_small_cnn().eval()
    twin = with_torch_batch_norm(model).eval()
    assert any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_ghost_renorm_equals_renorm_per_group():
    torch.manual_seed(0)
    ghost = GhostBatchRenorm2d(3, group_size=2, r_max=2.0, d_max=1.0)
    with torch.no_grad():
        ghost.running_mean.fill_(0.2)
        ghost.running_var.fill_(2.0)
    plain = [renorm_with_state_of(ghost) for _ in range(3)]  # one per group of 2
    x = torch.randn(6, 3, 4, 4) * 2
    y = ghost(x)
    expected = torch.cat([m(g) for m, g in zip(plain, x.split(2))])
    torch.testing.assert_close(y, expected)
    mean_of_updates = torch.stack([m.running_mean for m in plain]).mean(dim=0)
    torch.testing.assert_close(ghost.running_mean, mean_of_updates)
    ghost.eval()
    torch.testing.assert_close(ghost(x[:1]), ghost(x)[:1])


def renorm_with_state_of(module):
    """A plain BatchRenorm2d with the ghost layer's state, to normalize one group."""
    plain = normlib.BatchRenorm2d(3, r_max=2.0, d_max=1.0)
    plain.load_state_dict(module.state_dict())
    return plain


def test_with_ghost_renorm_replaces_every_batch_norm():
    model = with_ghost_renorm(SmallCNN(norm="batch", width=4), 2, warmup_steps=3)
    layers = [m for m in model.modules() if isinstance(m, GhostBatchRenorm2d)]
    assert len(layers) == 2 and all(m.warmup_steps == 3 for m in layers)
    with pytest.raises(ValueError, match="does not split into groups of 2"):
        model.train()(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        GhostBatchRenorm2d(3, group_size=0)


def test_residual_cnn_zero_init_is_the_identity():
    torch.manual_seed(0)
    model = ResidualCNN(5, width=4, zero_init_last_gamma=True)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.features(x), model.stem(x))
        assert not torch.equal(ResidualCNN(5, width=4).features(x), ResidualCNN(5, width=4).stem(x))


def test_train_steps_reports_every_step_and_rejects_bad_arguments():
    calls = []
    losses = train_steps(SmallCNN(width=4), tiny_split(), epochs=2, batch_size=16, lr=0.01, seed=0,
                         on_step=lambda m: calls.append(1))
    assert len(losses) == len(calls) == 8
    with pytest.raises(ValueError, match="lr_schedule"):
        train_steps(SmallCNN(width=4), tiny_split(), epochs=1, batch_size=16, lr=0.01, seed=0, lr_schedule="step")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train_steps(SmallCNN(width=4), tiny_split(), epochs=0, batch_size=16, lr=0.01, seed=0)
