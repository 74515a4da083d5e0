"""normlib.book.ghost_batch: BatchNorm over groups of a batch, and the fixed-schedule training run."""

from __future__ import annotations

import pytest
import torch

import normlib
from normlib.book.data import Split
from normlib.book.ghost_batch import (
    GhostBatchNorm2d,
    train_mode_accuracy,
    train_scheduled,
    with_ghost_batches,
)
from normlib.book.models import SmallCNN


def test_each_group_is_normalized_with_its_own_statistics():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1  # (N, C, H, W)
    ghost = GhostBatchNorm2d(3, group_size=2, batch_size=8)
    plain = normlib.BatchNorm2d(3)
    out = ghost(x)
    for group in range(4):
        rows = slice(2 * group, 2 * group + 2)
        torch.testing.assert_close(out[rows], plain(x[rows]))


def test_group_of_the_whole_batch_is_plain_batch_norm_including_running_statistics():
    torch.manual_seed(1)
    x = torch.randn(6, 2, 3, 3)
    ghost, plain = GhostBatchNorm2d(2, group_size=6, batch_size=6), normlib.BatchNorm2d(2)
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)
    torch.testing.assert_close(ghost.running_var, plain.running_var)


def test_momentum_is_divided_by_the_number_of_groups():
    assert GhostBatchNorm2d(4, group_size=2, batch_size=8).momentum == pytest.approx(0.025)


def test_eval_mode_uses_running_statistics():
    ghost = GhostBatchNorm2d(2, group_size=2, batch_size=4).eval()
    x = torch.randn(3, 2, 2, 2)  # any batch size in eval mode
    torch.testing.assert_close(ghost(x), x / (1 + 1e-5) ** 0.5)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"group_size": 0, "batch_size": 4}, "group_size"), ({"group_size": 3, "batch_size": 4}, "batch_size")],
)
def test_bad_sizes_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GhostBatchNorm2d(2, **kwargs)


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="groups of 4"):
        GhostBatchNorm2d(2, group_size=4, batch_size=8)(torch.randn(6, 2, 2, 2))


def test_with_ghost_batches_replaces_every_batch_norm_and_nothing_else():
    model = with_ghost_batches(SmallCNN(norm="batch", width=4), group_size=2, batch_size=8)
    kinds = [type(m) for m in model.modules() if isinstance(m, normlib.BatchNorm2d)]
    assert kinds == [GhostBatchNorm2d, GhostBatchNorm2d]
    group_model = with_ghost_batches(SmallCNN(norm="group", width=4), group_size=2, batch_size=8)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in group_model.modules())


def tiny_split() -> Split:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # a learnable two-class task
    return Split(x[:48], y[:48], x[48:], y[48:])


def test_train_scheduled_is_reproducible_and_learns():
    data = tiny_split()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = with_ghost_batches(SmallCNN(norm="batch", width=4, num_classes=2), group_size=4, batch_size=8)
        runs.append(train_scheduled(model, data, batch_size=8, epochs=6, lr=0.1, seed=3, measure_train_mode=True))
    assert runs[0] == runs[1]
    assert len(runs[0].eval_accuracy) == len(runs[0].train_mode_accuracy) == 6
    assert runs[0].train_accuracy > 0.8


def test_train_mode_accuracy_leaves_the_running_statistics_alone():
    data = tiny_split()
    model = SmallCNN(norm="batch", width=4, num_classes=2)
    before = [b.clone() for b in model.buffers()]
    train_mode_accuracy(model, data.x_test, data.y_test, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    with pytest.raises(ValueError, match="batch_size=5"):
        train_mode_accuracy(model, data.x_test, data.y_test, batch_size=5)
