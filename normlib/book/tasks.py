"""Generated sequence tasks for the Transformer chapters, and the loop that trains a model on them.

Each task maps a random sequence of digits to a target sequence of the same length, one label per
position: *copy* (the input itself), *reverse* (the input back to front) and *sort* (the input in
ascending order). The data are generated from a seeded ``torch.Generator``, so nothing is
downloaded and two runs with the same seed see the same batches. The tasks are small enough to
train in seconds on a CPU, yet reverse and sort cannot be solved without attention: the label at
a position depends on tokens at other positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

TASKS = ("copy", "reverse", "sort")
NUM_DIGITS = 10  # tokens 0..9
PAD = 10  # the padding token of variable-length batches; a model that sees it needs vocab_size 11
IGNORE = -100  # the target at padded positions: nn.CrossEntropyLoss skips it (its ignore_index)


def make_batch(
    task: str,
    batch_size: int,
    length: int,
    generator: torch.Generator,
    *,
    min_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random digit sequences and their targets, both int64 tensors of shape (B, T).

    With ``min_length``, each sequence has its own length, uniform in [min_length, length], and is
    padded at the end with :data:`PAD` up to ``length``, as batches of sentences are; the task then
    applies to the unpadded part and the targets at padded positions are :data:`IGNORE`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    inputs = torch.randint(0, NUM_DIGITS, (batch_size, length), generator=generator)  # (B, T)
    if task == "copy":
        targets = inputs.clone()
    elif task == "reverse":
        targets = inputs.flip(dims=[1])  # flip along T
    else:
        targets = inputs.sort(dim=1).values  # sort along T
    if min_length is None:
        return inputs, targets
    if not 1 <= min_length <= length:
        raise ValueError(f"min_length must be in [1, length={length}], got {min_length}")
    lengths = torch.randint(min_length, length + 1, (batch_size,), generator=generator)  # (B,)
    for row, n in enumerate(lengths.tolist()):
        inputs[row, n:] = PAD
        sequence = inputs[row, :n]
        if task == "reverse":
            targets[row, :n] = sequence.flip(dims=[0])
        elif task == "sort":
            targets[row, :n] = sequence.sort().values
        targets[row, n:] = IGNORE
    return inputs, targets


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based): a linear ramp from 1/warmup_steps up to 1
    over the first ``warmup_steps`` steps, then constant. ``warmup_steps=0`` means no warm-up.

    Constant after the ramp (not the inverse square-root decay of Vaswani et al.) so that a
    comparison with and without warm-up differs in the warm-up alone.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class SequenceHistory:
    """What :func:`train_on_task` measured: the loss of every step and the final test accuracy."""

    step_loss: list[float] = field(default_factory=list)
    token_accuracy: float = float("nan")  # fraction of positions right, on a held-out batch
    sequence_accuracy: float = float("nan")  # fraction of sequences right at every position

    @property
    def diverged(self) -> bool:
        return any(not math.isfinite(v) for v in self.step_loss)

    def smoothed(self, window: int = 20) -> np.ndarray:
        """The step losses averaged over a sliding window, for plots (length shrinks by window-1)."""
        losses = np.asarray(self.step_loss, dtype=np.float64)
        if window < 1 or window > len(losses):
            raise ValueError(f"window must be in [1, {len(losses)}], got {window}")
        return np.convolve(losses, np.ones(window) / window, mode="valid")


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(token accuracy, sequence accuracy) of ``model`` in eval mode on one batch of shape (B, T)."""
    was_training = model.training
    model.eval()
    predictions = model(inputs).argmax(dim=-1)  # (B, T)
    model.train(was_training)
    real = targets != IGNORE  # (B, T): padded positions do not count
    correct = (predictions == targets) | ~real  # (B, T)
    token_accuracy = (correct & real).sum().item() / real.sum().item()
    return token_accuracy, correct.all(dim=1).float().mean().item()


def train_on_task(
    model: nn.Module,
    task: str,
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    batch_size: int = 64,
    length: int = 8,
    min_length: int | None = None,
    seed: int = 0,
    progress: bool = False,
    label: str = "",
    history: SequenceHistory | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SequenceHistory:
    """Train ``model`` (token ids (B, T) -> logits (B, T, 10)) with Adam on fresh batches of ``task``.

    Adam with betas (0.9, 0.98) as in Vaswani et al. (2017) and Xiong et al. (2020); no gradient
    clipping, because clipping would hide the instability that the warm-up experiment looks for.
    Stops early when the loss becomes inf or NaN. ``progress=True`` prints one line at the end.
    ``min_length`` makes the batches variable-length and padded (see :func:`make_batch`).
    ``on_step(step)``, if given, runs before training (step 0) and after every step, for
    measurements along the way; ``history`` is filled in instead of a new one (a subclass of
    :class:`SequenceHistory` can carry those measurements).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    generator = torch.Generator().manual_seed(seed)
    test_inputs, test_targets = make_batch(
        task, 512, length, torch.Generator().manual_seed(seed + 10_000), min_length=min_length
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup_steps))
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    history = SequenceHistory() if history is None else history
    model.train()
    if on_step is not None:
        on_step(0)
    for step in range(1, steps + 1):
        inputs, targets = make_batch(task, batch_size, length, generator, min_length=min_length)
        logits = model(inputs)  # (B, T, V)
        loss = loss_fn(logits.flatten(0, 1), targets.flatten())  # over all B*T positions
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.step_loss.append(loss.item())
        if not math.isfinite(history.step_loss[-1]):
            break
        if on_step is not None:
            on_step(step)
    if not history.diverged:
        history.token_accuracy, history.sequence_accuracy = evaluate(model, test_inputs, test_targets)
    if progress:
        if history.diverged:
            print(f"{label}diverged at step {len(history.step_loss)}")
        else:
            last = float(np.mean(history.step_loss[-20:]))
            print(
                f"{label}final loss {last:.2f}, token accuracy {history.token_accuracy:.2f}, "
                f"sequence accuracy {history.sequence_accuracy:.2f}"
            )
    return history
