"""BatchNorm in practice: fine-tuning modes, folding into convolutions, recomputed statistics,
zero-initialized residual branches, weight decay on scale-invariant weights, and Batch
Renormalization with ghost batches.

Everything here is plumbing for the chapter "BatchNorm in practice": one training loop that can
hold BatchNorm layers in any of the three fine-tuning modes and report every step, the small
residual network whose last gamma per block can start at zero, and the helpers that rebuild
BatchNorm's statistics or fold them into the preceding convolution.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import normlib
from normlib.batch_renorm import BatchRenorm2d, batch_renorm
from normlib.book.data import Split

__all__ = [
    "BN_MODES",
    "BATCH_NORM_TYPES",
    "GhostBatchRenorm2d",
    "ResidualCNN",
    "fold_batch_norms",
    "precise_batch_norm",
    "same_class_pairs",
    "set_bn_mode",
    "train_steps",
    "with_ghost_renorm",
    "with_torch_batch_norm",
]

BATCH_NORM_TYPES = (normlib.BatchNorm2d, nn.BatchNorm2d)
BN_MODES = ("train", "eval", "frozen")  # fine-tuning: batch statistics / frozen statistics / frozen layer


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORM_TYPES + (BatchRenorm2d,))]


def set_bn_mode(model: nn.Module, mode: str) -> None:
    """Put every BatchNorm layer of ``model`` (already in training mode) in a fine-tuning mode.

    ``"train"``: batch statistics, running statistics updated, gamma and beta learned (the default
    of ``model.train()``). ``"eval"``: the running statistics normalize and stay fixed, gamma and
    beta are still learned. ``"frozen"``: as ``"eval"``, and gamma and beta are fixed too: the layer
    is a constant per-channel affine map (torchvision's and Detectron2's ``FrozenBatchNorm2d``).
    """
    if mode not in BN_MODES:
        raise ValueError(f"mode must be one of {BN_MODES}, got {mode!r}")
    for bn in _batch_norms(model):
        bn.train(mode == "train")
        for p in bn.parameters():
            p.requires_grad_(mode != "frozen")


def same_class_pairs(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An order of the samples in which positions 2k and 2k+1 hold two samples of the same class.

    The pairs are shuffled, so batches of an even size mix classes, but a BatchNorm whose statistics
    come from groups of 2 sees two images of one class: non-i.i.d. groups. An odd sample left over
    in a class is dropped for this epoch.
    """
    pairs = []
    for k in labels.unique():
        members = (labels == k).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        pairs.append(members[: len(members) // 2 * 2].view(-1, 2))  # (pairs of class k, 2)
    pairs = torch.cat(pairs)
    return pairs[torch.randperm(len(pairs), generator=generator)].flatten()


def train_steps(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "cosine",
    bn_mode: str = "train",
    order: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_step: Callable[[nn.Module], None] | None = None,
) -> list[float]:
    """SGD with momentum on cross-entropy; returns the loss of every step.

    The batches depend only on ``seed``: a seeded permutation each epoch (or ``order(labels,
    generator)``, e.g. :func:`same_class_pairs`), the last incomplete batch dropped. BatchNorm
    layers are held in ``bn_mode`` (see :func:`set_bn_mode`) at every step; parameters that the mode
    freezes are left out of the optimizer, so weight decay does not touch them either.
    ``on_step(model)`` runs after every optimizer step. ``lr_schedule`` is ``"cosine"`` (to 0
    over the run) or ``"constant"``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 1 <= batch_size <= len(data.y_train):
        raise ValueError(f"batch_size must be in [1, {len(data.y_train)}], got {batch_size}")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    model.train()
    set_bn_mode(model, bn_mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = len(data.y_train) // batch_size
    schedule = None
    if lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(epochs):
        if order is None:
            indices = torch.randperm(len(data.y_train), generator=generator)
        else:
            indices = order(data.y_train, generator)
        for start in range(0, len(indices) - batch_size + 1, batch_size):
            batch = indices[start : start + batch_size]
            loss = loss_fn(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(model)
    return losses


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference in which every ``Conv2d`` directly followed by a BatchNorm
    inside an ``nn.Sequential`` absorbs it (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the
    BatchNorm becoming ``nn.Identity``. The copy is in evaluation mode; ``model`` is unchanged."""
    folded = copy.deepcopy(model).eval()
    for sequential in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(sequential) - 1):
            conv, bn = sequential[i], sequential[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, BATCH_NORM_TYPES):
                sequential[i] = fuse_conv_bn_eval(conv, bn)
                sequential[i + 1] = nn.Identity()
    return folded


@torch.no_grad()
def precise_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``x`` with the weights held fixed
    ("precise BN", Wu & Johnson 2021); returns ``model``, left in evaluation mode.

    The same algorithm as ``torch.optim.swa_utils.update_bn``, which only recognizes torch's own
    BatchNorm classes: reset the statistics, set ``momentum=None`` (a cumulative average, every batch
    weighted equally), run the batches of ``batch_size`` in training mode, restore the momentum.
    """
    layers = [m for m in _batch_norms(model) if getattr(m, "running_mean", None) is not None]
    momenta = {bn: bn.momentum for bn in layers}
    model.train()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    for start in range(0, len(x) - batch_size + 1, batch_size):
        model(x[start : start + batch_size])
    for bn, value in momenta.items():
        bn.momentum = value
    return model.eval()


def with_torch_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``normlib.BatchNorm2d`` replaced by an ``nn.BatchNorm2d``
    holding the same parameters and statistics (for torch utilities that check the class)."""
    twin = copy.deepcopy(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, normlib.BatchNorm2d):
                replacement = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                             affine=child.affine)
                replacement.load_state_dict(child.state_dict())
                replacement.train(child.training)
                setattr(module, name, replacement)
            else:
                swap(child)

    swap(twin)
    return twin


class GhostBatchRenorm2d(BatchRenorm2d):
    """BatchRenorm2d whose training statistics come from consecutive groups of ``group_size`` samples.

    The groups are normalized in one call: (N, C, H, W) is regrouped as (g, G*C, H, W), so that
    every (group, channel) pair is one channel of :func:`normlib.batch_renorm`, with the running
    statistics repeated G times; the G updated copies are then averaged, which is one update with
    the mean of the groups' statistics. Evaluation is plain BatchRenorm2d.
    """

    def __init__(self, num_features: int, group_size: int, **kwargs) -> None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W)
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.group_size:
            raise ValueError(f"input: a batch of {n} samples does not split into groups of {self.group_size}")
        g, groups = self.group_size, n // self.group_size
        r_max, d_max = self.current_limits()
        self.num_batches_tracked.add_(1)
        grouped = x.reshape(groups, g, c, h, w).transpose(0, 1).reshape(g, groups * c, h, w)
        running_mean = self.running_mean.repeat(groups)  # (G*C,)
        running_var = self.running_var.repeat(groups)
        weight = None if self.weight is None else self.weight.repeat(groups)
        bias = None if self.bias is None else self.bias.repeat(groups)
        y = batch_renorm(grouped, running_mean, running_var, weight, bias, True, self.momentum, self.eps,
                         r_max, d_max)  # (g, G*C, H, W)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(groups, c).mean(dim=0))
            self.running_var.copy_(running_var.view(groups, c).mean(dim=0))
        return y.reshape(g, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def with_ghost_renorm(model: nn.Module, group_size: int, **kwargs) -> nn.Module:
    """Replace every BatchNorm2d of ``model``, in place, by a fresh :class:`GhostBatchRenorm2d`
    (``kwargs`` go to it: ``r_max``, ``d_max``, ``warmup_steps``, ``ramp_steps``...); returns ``model``."""
    for name, child in model.named_children():
        if isinstance(child, BATCH_NORM_TYPES):
            setattr(model, name, GhostBatchRenorm2d(child.num_features, group_size, eps=child.eps, **kwargs))
        else:
            with_ghost_renorm(child, group_size, **kwargs)
    return model


class _BasicBlock(nn.Module):
    """ResNet's basic block: x + BN(conv(ReLU(BN(conv(x))))), then ReLU (He et al., 2016)."""

    def __init__(self, width: int, zero_init_last_gamma: bool):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            normlib.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            normlib.BatchNorm2d(width),
        )
        if zero_init_last_gamma:  # Goyal et al. (2017): the block starts as the identity
            nn.init.zeros_(self.branch[-1].weight)

    def forward(self, x):
        return torch.relu(x + self.branch(x))  # (N, width, H, W)


class ResidualCNN(nn.Module):
    """A stem, ``num_blocks`` basic residual blocks at 8x8 and a linear head, for digits.

    ``zero_init_last_gamma=True`` starts the gamma of each block's last BatchNorm at 0, as Goyal et
    al. (2017) do for ResNet-50, so that every block is the identity map at initialization.
    """

    def __init__(self, num_blocks: int, width: int = 16, num_classes: int = 10, zero_init_last_gamma: bool = False):
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),  # (N, width, 8, 8)
            normlib.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[_BasicBlock(width, zero_init_last_gamma) for _ in range(num_blocks)])
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))  # (N, width, 8, 8)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))  # (N, num_classes)
