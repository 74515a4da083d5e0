"""Instruments for the tiny Transformer's stability at depth and at large learning rates.

What they read, per layer l = 1..L of a :class:`normlib.book.transformer.TinyTransformer`:

- the RMS of the residual stream x_l entering each block (and leaving the last one), which grows
  with depth in Pre-LN (Xiong et al. 2020) and is renormalized at every block in Post-LN;
- the gradient norm of each block's second MLP matrix, the W^{2,l} whose gradient Xiong et al.
  bound (chapter 4 measures the same);
- the largest attention logit q . k / sqrt(hs) and the attention entropy, whose growth and collapse
  Dehghani et al. (2023) and Wortsman et al. (2024) tie to divergence at large learning rates.

:func:`train_and_watch` trains a model like :func:`normlib.book.tasks.train_on_task` (same batches
for the same seed, Adam with betas (0.9, 0.98), no clipping) and reads the attention every few
steps; :func:`lr_sensitivity` is Wortsman et al.'s summary of a learning-rate sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from normlib.book.tasks import SequenceHistory, make_batch, train_on_task
from normlib.book.transformer import TinyTransformer

__all__ = [
    "WatchHistory",
    "attention_stats",
    "layer_grad_norms",
    "lr_sensitivity",
    "power_law_exponent",
    "residual_stream_rms",
    "train_and_watch",
]


@torch.no_grad()
def residual_stream_rms(model: TinyTransformer, idx: torch.Tensor) -> np.ndarray:
    """RMS over channels of the residual stream, averaged over the B*T tokens of ``idx``: entry l is
    the stream entering block l+1 (entry 0: the embeddings) and entry L the stream leaving the last
    block, before any final norm. Shape (L + 1,). The model runs in eval mode."""
    rms: list[float] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]  # (B, T, C)
        rms.append(x.pow(2).mean(dim=-1).sqrt().mean().item())  # RMS per token, mean over B*T

    handles = [block.register_forward_pre_hook(record) for block in model.blocks]
    handles.append(model.norm_f.register_forward_pre_hook(record))  # the last block's output
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return np.array(rms)


def layer_grad_norms(model: TinyTransformer) -> np.ndarray:
    """Frobenius norm of the gradient of each block's second MLP matrix (Xiong et al.'s W^{2,l}),
    after a backward pass. Shape (L,)."""
    norms = []
    for l, block in enumerate(model.blocks):
        grad = block.mlp.proj.weight.grad
        if grad is None:
            raise ValueError(f"block {l} has no gradient: call loss.backward() before layer_grad_norms")
        norms.append(grad.norm().item())
    return np.array(norms)


@torch.no_grad()
def attention_stats(model: TinyTransformer, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(max_logit, entropy)`` of every layer's attention on ``idx``, each of shape (L,).

    max_logit is the largest q . k / sqrt(hs) over heads, queries and keys; entropy is the mean over
    heads and queries of -sum_j p_j ln p_j (nats) of the softmax weights p. Uniform attention over T
    keys has entropy ln T; attention on one key has 0. The model runs in eval mode."""
    max_logit: list[float] = []
    entropy: list[float] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        logits = module.logits(args[0])  # (B, nh, T, T)
        log_p = logits.log_softmax(dim=-1)  # over the T keys
        max_logit.append(logits.max().item())
        entropy.append(-(log_p.exp() * log_p).sum(dim=-1).mean().item())

    handles = [block.attn.register_forward_pre_hook(record) for block in model.blocks]
    was_training = model.training
    model.eval()  # reading must not move BatchNorm's running statistics
    try:
        model(idx)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return np.array(max_logit), np.array(entropy)


@dataclass
class WatchHistory(SequenceHistory):
    """What :func:`train_and_watch` measured: :class:`~normlib.book.tasks.SequenceHistory`'s loss per
    step and accuracies, and ``watched_steps``, the steps (0 = before training) at which the
    attention was read; ``max_logit`` and ``min_entropy`` are the largest max-logit and the smallest
    entropy over the layers at those steps; ``output_log_z`` is the mean over tokens of |ln Z|,
    Z = sum_v exp(z_v) of the output logits z (what z-loss penalizes, Wortsman et al. 2024)."""

    watched_steps: list[int] = field(default_factory=list)
    max_logit: list[float] = field(default_factory=list)
    min_entropy: list[float] = field(default_factory=list)
    output_log_z: list[float] = field(default_factory=list)

    def final_loss(self, window: int = 20) -> float:
        """Mean loss of the last ``window`` steps; inf if the run diverged."""
        if self.diverged:
            return math.inf
        return float(np.mean(self.step_loss[-window:]))


def train_and_watch(
    model: TinyTransformer,
    task: str,
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    batch_size: int = 64,
    length: int = 8,
    seed: int = 0,
    watch_every: int = 10,
) -> WatchHistory:
    """Train ``model`` with Adam (betas 0.9, 0.98) on fresh batches of ``task`` and read its attention
    (:func:`attention_stats`) on a fixed batch before training and every ``watch_every`` steps.

    The training is :func:`normlib.book.tasks.train_on_task`'s, with the same seed; it stops when the
    loss becomes inf or NaN."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if watch_every < 1:
        raise ValueError(f"watch_every must be >= 1, got {watch_every}")
    # train_on_task's held-out batch (the same seed): its first 64 sequences are the ones watched
    test_inputs, _ = make_batch(task, 512, length, torch.Generator().manual_seed(seed + 10_000))
    watch_inputs = test_inputs[:64]  # (64, T)
    history = WatchHistory()

    def watch(step: int) -> None:
        if step % watch_every:
            return
        max_logit, entropy = attention_stats(model, watch_inputs)
        history.watched_steps.append(step)
        history.max_logit.append(float(max_logit.max()))
        history.min_entropy.append(float(entropy.min()))
        with torch.no_grad():
            model.eval()
            log_z = model(watch_inputs).logsumexp(dim=-1)  # (64, T): ln Z of every token
            model.train()
        history.output_log_z.append(log_z.abs().mean().item())

    train_on_task(
        model, task, steps=steps, lr=lr, warmup_steps=warmup_steps, batch_size=batch_size,
        length=length, seed=seed, history=history, on_step=watch,
    )
    return history


def lr_sensitivity(final_losses: Sequence[float], initial_loss: float, best_loss: float) -> float:
    """Wortsman et al. (2024)'s learning-rate sensitivity of one sweep: the mean over the learning
    rates of min(final loss, initial loss) - best loss. A diverged run (inf or NaN) counts as the
    initial loss, so a sweep that fails at some learning rates scores higher; ``best_loss`` is the
    lowest final loss over the sweeps being compared."""
    if not final_losses:
        raise ValueError("final_losses must hold one loss per learning rate, got none")
    capped = [initial_loss if not math.isfinite(v) else min(v, initial_loss) for v in final_losses]
    return float(np.mean(capped) - best_loss)


def power_law_exponent(x: Sequence[float], y: Sequence[float]) -> float:
    """The slope p of the least-squares line through (ln x, ln y): y grows about as x**p."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"x and y must be two equal-length sequences of >= 2 values, got {x.shape} and {y.shape}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("x and y must be positive to take their logarithms")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
