"""Conditional normalization: a norm's scale and shift computed from a conditioning input.

A norm ends with a per-channel affine map, y = gamma * x_hat + beta. A conditional norm lets gamma
and beta depend on something else than the layer's input -- a class label, a text embedding, a
diffusion time step -- so that one network computes a family of functions, one per condition.
Three forms dominate, and this file holds one module for each:

- :class:`FiLM` (Perez et al., 2018): feature-wise linear modulation, y = gamma(c) * x + beta(c),
  with gamma and beta a learned function of a conditioning vector c; it can follow any layer.
- :class:`ConditionalBatchNorm2d` (de Vries et al., 2017; Dumoulin et al., 2017 for InstanceNorm):
  BatchNorm whose gamma and beta are looked up per class, gamma[y] and beta[y].
- :class:`AdaLNZeroBlock` (Peebles & Xie, 2023, DiT): a residual block x + gate(c) * F(modulated
  LayerNorm(x)), whose shift, scale and gate come from c through a linear layer initialized to
  zero, so that every block starts as the identity.

AdaIN (Huang & Belongie, 2017), whose gamma and beta are the statistics of a style image, is
the fourth member of the family; chapter 6 builds it. Tensors are channels-first, ``(N, C, *spatial)``,
with the condition c of shape (N, D) or the labels y of shape (N,).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlib.batch_norm import BatchNorm2d
from normlib.layer_norm import layer_norm

__all__ = ["film", "FiLM", "ConditionalBatchNorm2d", "AdaLNZeroBlock"]


def _check_features(x: Tensor, num_features: int | None) -> None:
    """``x`` is a float tensor (N, C, *spatial) with C = ``num_features`` (None: any C)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"input must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() < 2 or (num_features is not None and x.shape[1] != num_features):
        channels = "C" if num_features is None else num_features
        raise ValueError(f"input must have shape (N, {channels}, *spatial) (channels first), got {tuple(x.shape)}")


def _check_condition(cond: Tensor, batch: int, features: int) -> None:
    if not isinstance(cond, Tensor) or not cond.is_floating_point():
        raise TypeError(f"cond must be a floating-point torch.Tensor of shape (N, D), got {type(cond).__name__}")
    if cond.shape != (batch, features):
        raise ValueError(f"cond must have shape (N, D) = ({batch}, {features}), got {tuple(cond.shape)}")


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """(N, C) -> (N, C, 1, ..., 1), to broadcast against (N, C, *spatial)."""
    return v.reshape(v.shape + (1,) * (ndim - 2))


def film(input: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    r"""Feature-wise linear modulation: :math:`y_{n,c,\ldots} = \gamma_{n,c}\, x_{n,c,\ldots} + \beta_{n,c}`.

    ``gamma`` and ``beta`` are (N, C): one scale and one shift per sample and channel, shared by
    every spatial position (Perez et al., 2018, Eq. 1). Unlike a norm's affine map they differ
    from sample to sample.
    """
    _check_features(input, None)
    expected = tuple(input.shape[:2])
    for name, t in (("gamma", gamma), ("beta", beta)):
        if not isinstance(t, Tensor) or tuple(t.shape) != expected:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (N, C) = {expected}, got {shape}")
    return input * _per_channel(gamma, input.dim()) + _per_channel(beta, input.dim())


class FiLM(nn.Module):
    r"""FiLM layer: gamma and beta computed from a condition vector c by one linear map.

    .. math::

        (\Delta\gamma, \beta) = W c + b, \qquad y = (1 + \Delta\gamma) \odot x + \beta

    Writing gamma as 1 + delta_gamma starts the layer near the identity at the usual small
    initialization of W (de Vries et al., 2017 predict such changes of gamma and beta for the same
    reason). Perez et al. (2018) place FiLM after a BatchNorm without affine parameters, so that
    FiLM's gamma and beta take the role of the norm's.
    """

    def __init__(self, num_features: int, cond_features: int) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("cond_features", cond_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features = num_features
        self.cond_features = cond_features
        self.generator = nn.Linear(cond_features, 2 * num_features)  # c -> (delta_gamma, beta)

    def forward(self, input: Tensor, cond: Tensor) -> Tensor:
        _check_features(input, self.num_features)
        _check_condition(cond, input.shape[0], self.cond_features)
        delta_gamma, beta = self.generator(cond).chunk(2, dim=1)  # (N, C) each
        return film(input, 1.0 + delta_gamma, beta)

    def extra_repr(self) -> str:
        return f"{self.num_features}, cond_features={self.cond_features}"


class ConditionalBatchNorm2d(nn.Module):
    r"""BatchNorm2d with one (gamma, beta) pair per class: y = gamma[y_n] * x_hat + beta[y_n].

    .. math::

        \hat{x}_{n,c,h,w} = \frac{x_{n,c,h,w} - \mathrm{mean}_c}{\sqrt{\mathrm{var}_c + \varepsilon}}, \qquad
        y_{n,c,h,w} = \gamma_{k_n, c}\, \hat{x}_{n,c,h,w} + \beta_{k_n, c}

    where k_n is sample n's class. The statistics are BatchNorm's (over the batch, running
    averages at inference, the same buffers as ``nn.BatchNorm2d``); only the affine map is
    conditional. It is FiLM on a BatchNorm output with a one-hot condition: a linear map of a
    one-hot vector is a table lookup. The tables start at gamma = 1, beta = 0.
    """

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.norm = BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(num_classes, num_features))  # gamma, one row per class
        self.bias = nn.Parameter(torch.zeros(num_classes, num_features))  # beta, one row per class

    def forward(self, input: Tensor, labels: Tensor) -> Tensor:
        _check_features(input, self.num_features)
        if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.shape != (input.shape[0],):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be a long tensor of shape (N,) = ({input.shape[0]},), got {got}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got values from "
                             f"{int(labels.min())} to {int(labels.max())}")
        x_hat = self.norm(input)  # (N, C, H, W)
        return film(x_hat, self.weight[labels], self.bias[labels])  # (N, C) rows per sample

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_classes={self.num_classes}"


class AdaLNZeroBlock(nn.Module):
    r"""A residual block conditioned as in DiT (Peebles & Xie, 2023): adaLN-Zero.

    .. math::

        (\mathrm{shift}, \mathrm{scale}, \mathrm{gate}) = W\,\mathrm{SiLU}(c) + b, \qquad
        y = x + \mathrm{gate} \odot F\big(\mathrm{LN}(x) \odot (1 + \mathrm{scale}) + \mathrm{shift}\big)

    LN is a LayerNorm over the C channels at each position, without affine parameters (eps 1e-6, as
    in DiT): its gamma and beta are the condition's scale and shift. W and b start at zero, so
    gate = 0 and the block is exactly the identity at initialization, whatever c and F; the
    authors found this zero initialization better than plain adaLN and than conditioning through
    cross-attention or extra tokens. A DiT block has two such branches, attention and MLP, each with
    its own (shift, scale, gate): six vectors from one linear map. ``sublayer`` is F; it must map
    ``(N, C, *spatial)`` to the same shape.
    """

    def __init__(self, sublayer: nn.Module, num_features: int, cond_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("cond_features", cond_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(sublayer, nn.Module):
            raise TypeError(f"sublayer must be an nn.Module, got {type(sublayer).__name__}")
        self.num_features = num_features
        self.cond_features = cond_features
        self.eps = eps
        self.sublayer = sublayer
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_features, 3 * num_features))
        nn.init.zeros_(self.modulation[1].weight)  # the "Zero" of adaLN-Zero
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, input: Tensor, cond: Tensor) -> Tensor:
        _check_features(input, self.num_features)
        _check_condition(cond, input.shape[0], self.cond_features)
        shift, scale, gate = self.modulation(cond).chunk(3, dim=1)  # (N, C) each
        # LayerNorm over the channels at each position: move C last, normalize, move it back
        h = layer_norm(input.movedim(1, -1), (self.num_features,), eps=self.eps).movedim(-1, 1)
        h = film(h, 1.0 + scale, shift)
        return input + _per_channel(gate, input.dim()) * self.sublayer(h)

    def extra_repr(self) -> str:
        return f"{self.num_features}, cond_features={self.cond_features}, eps={self.eps}"
