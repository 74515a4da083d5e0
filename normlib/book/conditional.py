"""A class-conditional denoiser for digits whose residual blocks are conditioned in one of four ways,
so that the chapter on conditional norms can compare them with everything else held fixed.

The task: given a digit corrupted by Gaussian noise, x + noise_std * z, and its class label,
predict the clean digit. With strong noise the label carries information the pixels have lost, so
a model that uses its condition denoises better than one that cannot; feeding a wrong label shows
how much the model relies on it. Every variant has the same stem, the same number of residual
blocks, each ``h + conv(SiLU(norm(h)))``, and the same head; only how the label enters differs:

``"none"``        BatchNorm with learned gamma, beta; the label is ignored (the baseline);
``"film"``        BatchNorm without affine, then FiLM from a learned label embedding;
``"cbn"``         conditional BatchNorm: one (gamma, beta) pair per class;
``"adaln_zero"``  DiT's block: LayerNorm over channels, shift/scale/gate from the label embedding,
                  zero-initialized so that every block starts as the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import normlib

__all__ = ["CONDITIONINGS", "ConditionalDenoiser", "denoising_error", "noisy", "train_denoiser"]

CONDITIONINGS = ("none", "film", "cbn", "adaln_zero")


class _ResidualBlock(nn.Module):
    """h + conv(SiLU(norm(h))), the norm conditioned as ``kind`` says (adaLN-Zero also gates)."""

    def __init__(self, kind: str, width: int, cond_features: int, num_classes: int):
        super().__init__()
        self.kind = kind
        conv = nn.Conv2d(width, width, 3, padding=1)
        if kind == "adaln_zero":
            self.block = normlib.AdaLNZeroBlock(nn.Sequential(nn.SiLU(), conv), width, cond_features)
            return
        self.conv = conv
        if kind == "cbn":
            self.norm = normlib.ConditionalBatchNorm2d(width, num_classes)
        elif kind == "film":
            self.norm = normlib.BatchNorm2d(width, affine=False)
            self.film = normlib.FiLM(width, cond_features)
        else:
            self.norm = normlib.BatchNorm2d(width)

    def forward(self, h: torch.Tensor, labels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.kind == "adaln_zero":
            return self.block(h, cond)
        if self.kind == "cbn":
            z = self.norm(h, labels)
        elif self.kind == "film":
            z = self.film(self.norm(h), cond)
        else:
            z = self.norm(h)
        return h + self.conv(F.silu(z))  # (N, width, 8, 8)


class ConditionalDenoiser(nn.Module):
    """Stem conv -> ``num_blocks`` conditioned residual blocks -> head conv: (N, 1, 8, 8) -> (N, 1, 8, 8).

    ``conditioning`` is one of :data:`CONDITIONINGS`. The label embedding (``cond_features`` wide)
    feeds FiLM and adaLN-Zero; conditional BatchNorm indexes its own tables with the label.
    """

    def __init__(self, conditioning: str, width: int = 32, num_blocks: int = 3, num_classes: int = 10,
                 cond_features: int = 32):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.conditioning = conditioning
        self.stem = nn.Conv2d(1, width, 3, padding=1)  # (N, width, 8, 8)
        self.embedding = nn.Embedding(num_classes, cond_features)
        self.blocks = nn.ModuleList(
            _ResidualBlock(conditioning, width, cond_features, num_classes) for _ in range(num_blocks)
        )
        self.head = nn.Conv2d(width, 1, 3, padding=1)  # (N, 1, 8, 8)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        cond = self.embedding(labels)  # (N, cond_features)
        for block in self.blocks:
            h = block(h, labels, cond)
        return self.head(h)


def noisy(x: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """x + noise_std * z with z ~ N(0, 1) drawn from ``generator``."""
    return x + noise_std * torch.randn(x.shape, generator=generator)


def train_denoiser(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, noise_std: float, epochs: int,
                   batch_size: int, lr: float, seed: int) -> list[float]:
    """Adam on the mean squared error between the prediction and the clean digit; returns the loss of
    every step. Data order and noise depend only on ``seed``, so all variants see the same batches."""
    if epochs < 1 or not 1 <= batch_size <= len(x):
        raise ValueError(f"need epochs >= 1 and 1 <= batch_size <= {len(x)}, got {epochs} and {batch_size}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            clean = x[batch]
            loss = F.mse_loss(model(noisy(clean, noise_std, generator), labels[batch]), clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def denoising_error(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, noise_std: float,
                    seed: int = 0) -> float:
    """Mean squared error of the denoised ``x`` (evaluation mode), with noise drawn from ``seed``:
    pass the true labels, or wrong ones to see how much the model relies on them."""
    was_training = model.training
    model.eval()
    corrupted = noisy(x, noise_std, torch.Generator().manual_seed(seed))
    error = F.mse_loss(model(corrupted, labels), x).item()
    model.train(was_training)
    return error
