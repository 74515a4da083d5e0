"""BatchNorm whose statistics come from part of a batch ("ghost batches"), and a training run that
holds everything else fixed, so that an experiment varies only the size of BatchNorm's statistics group.

Changing the batch size of a whole training run changes three things at once: how many samples
BatchNorm's statistics pool, how many optimizer steps there are, and how noisy the gradient is. A
multi-GPU run separates them: every device normalizes its own share of the batch, while the gradient
and the step are those of the whole batch. :class:`GhostBatchNorm2d` does the same on one machine
(Hoffer et al. 2017 call the groups "ghost batches"), and :func:`train_scheduled` trains with fixed
batches, a fixed data order and a cosine learning-rate schedule, so that two runs that differ only in
the group size see the same images in the same order with the same learning rates. Batch-independent
norms (GroupNorm, LayerNorm, InstanceNorm) give the same run whatever the group size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

import normlib
from normlib.book.data import Split
from normlib.book.train import accuracy, train_classifier

__all__ = ["GhostBatchNorm2d", "ScheduledRun", "train_mode_accuracy", "train_scheduled", "with_ghost_batches"]


class GhostBatchNorm2d(normlib.BatchNorm2d):
    """BatchNorm2d whose training statistics come from consecutive groups of ``group_size`` samples.

    Evaluation mode is plain BatchNorm with the running statistics. The running statistics are
    updated once per group; dividing the momentum by the number of groups in a batch of
    ``batch_size`` keeps their averaging window at the usual ~1/momentum batches.
    """

    def __init__(self, num_features: int, group_size: int, batch_size: int, momentum: float = 0.1, **kwargs):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if not isinstance(batch_size, int) or batch_size < group_size or batch_size % group_size:
            raise ValueError(
                f"batch_size must be a positive multiple of group_size={group_size}, got {batch_size!r}"
            )
        super().__init__(num_features, momentum=momentum * group_size / batch_size, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        if not self.training:
            return super().forward(x)
        if x.shape[0] % self.group_size:
            raise ValueError(
                f"input: a batch of {x.shape[0]} samples does not split into groups of {self.group_size}"
            )
        return torch.cat([super(GhostBatchNorm2d, self).forward(g) for g in x.split(self.group_size)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def with_ghost_batches(model: nn.Module, group_size: int, batch_size: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` (normlib's or torch's), in place, by a
    :class:`GhostBatchNorm2d` with the same features, eps and affine setting; returns ``model``.

    The new layers start from scratch (gamma 1, beta 0, fresh running statistics): call it on a
    freshly built model.
    """
    for name, child in model.named_children():
        if isinstance(child, (normlib.BatchNorm2d, nn.BatchNorm2d)):
            ghost = GhostBatchNorm2d(
                child.num_features, group_size, batch_size, eps=child.eps, affine=child.affine
            )
            setattr(model, name, ghost)
        else:
            with_ghost_batches(child, group_size, batch_size)
    return model


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy with BatchNorm in training mode: each test batch normalized with its own statistics
    (a ghost-batch layer splits it into its groups), on a copy so that the running statistics of
    ``model`` stay untouched. ``len(y)`` must be a multiple of ``batch_size``."""
    if len(y) % batch_size:
        raise ValueError(f"batch_size={batch_size} must divide the {len(y)} test samples")
    probe = copy.deepcopy(model).train()
    predictions = torch.cat([probe(x[i : i + batch_size]).argmax(dim=-1) for i in range(0, len(y), batch_size)])
    return (predictions == y).float().mean().item()


@dataclass
class ScheduledRun:
    """What :func:`train_scheduled` measured; accuracies are fractions in [0, 1]."""

    eval_accuracy: list[float] = field(default_factory=list)  # test, eval mode, after each epoch
    train_mode_accuracy: list[float] = field(default_factory=list)  # test, train mode (if measured)
    train_accuracy: float = float("nan")  # training set, eval mode, after the last epoch


def train_scheduled(
    model: nn.Module,
    data: Split,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    measure_train_mode: bool = False,
) -> ScheduledRun:
    """SGD with momentum and a cosine learning-rate schedule decaying ``lr`` to 0 over the run
    (:func:`normlib.book.train.train_classifier` with ``lr_schedule="cosine"``).

    The batches depend only on ``seed`` (a seeded permutation each epoch, the last incomplete batch
    dropped), so runs with the same seed and batch size see the same images in the same order,
    whatever their norm. ``measure_train_mode`` also records the test accuracy with BatchNorm in
    training mode after each epoch (batches of ``batch_size`` test samples).
    """
    run = ScheduledRun()

    def after_epoch(_epoch: int, trained: nn.Module) -> None:
        if measure_train_mode:
            run.train_mode_accuracy.append(train_mode_accuracy(trained, data.x_test, data.y_test, batch_size))

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    history = train_classifier(
        model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, momentum=momentum,
        weight_decay=weight_decay, lr_schedule="cosine", on_epoch_end=after_epoch,
    )
    run.eval_accuracy = history.epoch_test_accuracy
    run.train_accuracy = accuracy(model, data.x_train, data.y_train)
    return run
