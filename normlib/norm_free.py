"""Training residual networks without normalization layers: the pieces that replace what a norm did.

A BatchNorm in every residual branch does two things at initialization that a plain residual
network lacks (De & Smith, 2020): it shrinks each branch relative to the skip path, so the
residual stream's variance grows slowly with depth instead of exploding, and it keeps the
activations of every channel centred and of unit scale. The alternatives here each restore one
of these by other means:

``SkipInit`` (De & Smith, 2020; ReZero, Bachlechner et al., 2021)
    A learnable scalar, initialized to 0, at the end of each residual branch: every block starts
    as the identity, the network as a shallow one, and depth is "switched on" by training.
``ScaledWSConv2d`` (Brock et al., 2021a)
    A convolution whose weights are standardized per output channel, with a learnable gain:
    each output channel then has zero mean and the variance that keeps a unit-variance input at
    unit variance, with no statistics of the activations.
``adaptive_grad_clip`` (Brock et al., 2021b)
    Unit-wise adaptive gradient clipping: a step's gradient may not be large relative to the weight
    it changes, which stands in for the way BatchNorm ties the effective step size to the weight
    norm and lets NF-Nets train at large batch sizes and learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["RELU_GAMMA", "ScaledWSConv2d", "SkipInit", "adaptive_grad_clip", "unitwise_norm"]

# The gain that restores unit variance after a ReLU of a unit Gaussian: Var(relu(z)) = (1 - 1/pi)/2
# around its own mean, so gamma = sqrt(2 / (1 - 1/pi)) = 1.7129 (Brock et al., 2021a, whose code uses
# 1.7140, estimated by sampling).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class SkipInit(nn.Module):
    r"""A learnable scalar gain :math:`\alpha`, initialized to ``init`` (0 in SkipInit and ReZero).

    Put it at the end of a residual branch, :math:`x_{l+1} = x_l + \alpha_l f_l(x_l)`: with
    alpha = 0 every block is the identity at initialization, whatever the depth.
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(init, (int, float)) and math.isfinite(init)):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.init = float(init)
        self.gain = nn.Parameter(torch.full((), self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gain, self.init)

    def forward(self, input: Tensor) -> Tensor:
        return self.gain * input

    def extra_repr(self) -> str:
        return f"init={self.init}"


class ScaledWSConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` with Scaled Weight Standardization (Brock et al., 2021a).

    For output channel i with fan-in N = in_channels/groups * kernel_height * kernel_width, the
    convolution uses

    .. math::

        \hat{W}_{ij} = \gamma\, g_i\, \frac{W_{ij} - \mu_i}{\sqrt{\max(N \sigma_i^2, \varepsilon)}}

    where mu_i and sigma_i^2 are the mean and (population) variance of row i of W, g_i a learnable
    gain (ones; absent when ``gain=False``) and gamma a fixed constant for the activation that
    precedes the layer (``RELU_GAMMA`` after a ReLU). eps under a ``max`` as in the authors'
    code. Each output channel then has weights of mean 0 and squared norm gamma^2 g_i^2: a
    unit-variance input with independent entries gives output channels of variance gamma^2 g_i^2
    and no shift, as Kaiming initialization would give, but kept throughout training.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | str | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        gain: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.gamma = float(gamma)
        self.eps = float(eps)
        if gain:
            self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=device, dtype=dtype))
        else:
            self.register_parameter("gain", None)

    def standardized_weight(self) -> Tensor:
        """The weight the convolution uses, (out_channels, in_channels/groups, kh, kw)."""
        weight = self.weight
        fan_in = weight[0].numel()
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)  # (out, 1, 1, 1)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)  # (out, 1, 1, 1)
        scale = self.gamma * torch.rsqrt(torch.clamp(var * fan_in, min=self.eps))
        if self.gain is not None:
            scale = scale * self.gain
        return (weight - mean) * scale

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gain={self.gain is not None}, gamma={self.gamma:.4g}, eps={self.eps:g}"


def unitwise_norm(tensor: Tensor) -> Tensor:
    """The Frobenius norm of each output unit of ``tensor``, broadcastable against it.

    A unit is a row of a weight matrix: for a Linear weight (out, in) or a conv weight
    (out, in, kh, kw), the norm over every dimension but the first; for a bias or any
    one-dimensional (or scalar) parameter, the norm of the whole tensor, as in the authors' code.
    """
    if tensor.dim() <= 1:
        return tensor.norm()
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.dim())), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip(
    parameters: Tensor | Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    r"""Unit-wise Adaptive Gradient Clipping (Brock et al., 2021b), in place on each ``.grad``.

    For every unit i of every parameter W with gradient G (see :func:`unitwise_norm`):

    .. math::

        G_i \leftarrow \begin{cases}
            \lambda \dfrac{\max(\lVert W_i\rVert, \varepsilon)}{\lVert G_i\rVert} G_i
                & \text{if } \dfrac{\lVert G_i\rVert}{\max(\lVert W_i\rVert, \varepsilon)} > \lambda \\
            G_i & \text{otherwise}
        \end{cases}

    with lambda = ``clipping``. eps keeps zero-initialized weights (biases, SkipInit gains) from
    being frozen. Call it between ``loss.backward()`` and ``optimizer.step()``; the paper does not
    clip the final linear layer, so pass the parameters without it. Parameters without a gradient
    are skipped.
    """
    if not (isinstance(clipping, (int, float)) and math.isfinite(clipping) and clipping > 0):
        raise ValueError(f"clipping must be a positive number, got {clipping!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    for param in parameters:
        if not isinstance(param, Tensor):
            raise TypeError(f"parameters must be tensors, got {type(param).__name__}")
        if param.grad is None:
            continue
        max_norm = unitwise_norm(param).clamp(min=eps) * clipping
        grad_norm = unitwise_norm(param.grad)
        # 1e-6 guards the division only; where it matters, grad_norm <= max_norm and nothing changes
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), 1.0)
        param.grad.mul_(factor.to(param.grad.dtype))

