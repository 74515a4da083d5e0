"""Seeding, a small training loop and evaluation, shared by every chapter that trains a model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from normlib.book.data import Split


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch.

    Two runs with the same seed on the same machine give the same numbers. Across machines the
    last bits of float sums can differ (different SIMD widths), which is why notebooks print
    rounded values. Returns nothing, so a notebook cell that ends with it prints nothing.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class History:
    """What a run of :func:`train_classifier` measured: per step and per epoch."""

    step_loss: list[float] = field(default_factory=list)
    epoch_train_loss: list[float] = field(default_factory=list)
    epoch_test_accuracy: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return any(not np.isfinite(v) for v in self.step_loss)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of correct predictions, in eval mode (BatchNorm uses running statistics)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += (logits.argmax(dim=-1) == y[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(y)


def train_classifier(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    progress: bool = False,
    label: str = "",
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> History:
    """Train with cross-entropy, shuffling with a seeded generator; evaluate after each epoch.

    Stops early (and says so in the history) when the loss becomes inf or NaN, so a learning-rate
    sweep can count diverged runs instead of crashing. ``progress=True`` prints one line an epoch.
    The last incomplete batch is dropped so that every BatchNorm step sees ``batch_size`` samples.
    ``on_epoch_end(epoch, model)``, if given, is called after each completed epoch's evaluation
    (epoch counted from 1), so an experiment can measure the model as it trains.
    ``lr_schedule="cosine"`` decays ``lr`` to 0 over the run, step by step, so that a run ends in a
    settled state rather than mid-oscillation and final errors are comparable.
    """
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if batch_size < 1 or batch_size > len(data.y_train):
        raise ValueError(f"batch_size must be in [1, {len(data.y_train)}], got {batch_size}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    schedule = None
    if lr_schedule == "cosine":
        total_steps = epochs * (len(data.y_train) // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    loss_fn = nn.CrossEntropyLoss()
    n = len(data.y_train)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            value = loss.item()
            history.step_loss.append(value)
            losses.append(value)
            if not np.isfinite(value):
                break
        history.epoch_train_loss.append(float(np.mean(losses)))
        if history.diverged:
            history.epoch_test_accuracy.append(float("nan"))
            if progress:
                print(f"{label}epoch {epoch + 1}/{epochs}: diverged (loss is not finite)")
            break
        history.epoch_test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if progress:
            print(
                f"{label}epoch {epoch + 1}/{epochs}: train loss {history.epoch_train_loss[-1]:.2f}, "
                f"test accuracy {history.epoch_test_accuracy[-1]:.2f}"
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model)
    return history
