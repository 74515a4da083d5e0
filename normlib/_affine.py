"""The learned affine map y = gamma * x_hat + beta that most norm modules end with.

torch.nn names gamma ``weight`` and beta ``bias``, registers them as ``None`` when they are turned
off (so ``state_dict`` keys match exactly), and starts them at the identity map. Every normlib
module with both follows that here, in one place; RMSNorm, which has no beta, keeps its own.
"""

from __future__ import annotations

import torch
from torch import nn


def register_affine(module: nn.Module, shape: int | tuple[int, ...], *, affine: bool, bias: bool,
                    factory_kwargs: dict) -> None:
    """Give ``module`` parameters ``weight`` (gamma) and ``bias`` (beta) of ``shape``, or ``None``."""
    weight = nn.Parameter(torch.empty(shape, **factory_kwargs)) if affine else None
    beta = nn.Parameter(torch.empty(shape, **factory_kwargs)) if affine and bias else None
    module.register_parameter("weight", weight)
    module.register_parameter("bias", beta)


def reset_affine(module: nn.Module) -> None:
    """Start at the identity map: gamma = 1, beta = 0."""
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
