"""RMSNorm (Zhang & Sennrich, 2019): LayerNorm without the mean.

Each row is divided by its root mean square and scaled by a learned weight (gamma). There is no
re-centering and no bias: the paper's argument is that LayerNorm's benefit comes from the
re-scaling, and dropping the mean saves a reduction. Llama-style Transformers use it.

Conventions, stated once (sources differ): epsilon goes *inside* the square root,
x / sqrt(mean(x^2) + eps), as in torch.nn.RMSNorm and Meta's Llama code (other implementations
write x / (RMS(x) + eps), which differs for rows whose RMS is not much larger than eps); there is no learned shift beta; and
``eps=None`` means what it means in torch.nn.RMSNorm (PyTorch >= 2.x docs): the machine epsilon of
the computation dtype, ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and float32 inputs
and ``torch.finfo(torch.float64).eps`` for float64.

Models built on RMSNorm differ in two more details, chosen with keyword options of :func:`rms_norm`
and :class:`RMSNorm`:

``offset``
    The scale is ``offset + weight`` instead of ``weight``. Gemma's code writes ``(1 + weight)``
    with the weight initialized to zeros, so that weight decay pulls the scale towards 1 rather
    than 0; :class:`RMSNorm` initializes its weight to ``1 - offset``, so every layer starts as
    plain RMS scaling.
``casting``
    Where a float16 or bfloat16 result is rounded (each name is the model code it transcribes):

    - ``"torch"``: :class:`torch.nn.RMSNorm`. In PyTorch 2.13 the statistics, the scaling and the
      weight are computed in float32 and the result is rounded once.
    - ``"llama"``: Hugging Face's ``LlamaRMSNorm`` (also Mistral's and Qwen2's): normalize in
      float32, round to the input's dtype, then multiply by the weight in the weight's dtype
      (the result takes the promoted dtype of the two, as in the model code).
    - ``"gemma"``: Hugging Face's ``GemmaRMSNorm``: normalize and scale by
      ``offset + weight`` in float32, round once to the input's dtype at the end.

    float64 inputs are computed in float64 under every convention (the model code would compute
    them in float32). The "torch" backend runs the model code's own operations, so it matches them
    bit for bit; the fused kernels round once, which for ``"llama"`` with a weight of the input's
    dtype is within one unit in the last place of the double rounding above.

This file holds, in reading order: the NumPy reference (forward and backward), the functional ops
``rms_norm`` (``torch.nn.functional.rms_norm``'s signature plus ``backend``) and ``add_rms_norm``
(the pre-norm residual add fused with the norm), and the module ``RMSNorm`` (a drop-in for
``torch.nn.RMSNorm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlib._checks import (
    RMS_NORM_DEFAULT_EPS,
    as_normalized_shape,
    check_backend_name,
    check_eps,
    check_input,
    check_normalized_shape,
    check_residual,
    check_tensor_like_input,
)
from normlib._autograd import scriptable_twin
from normlib.backends import resolve

__all__ = [
    "RMSNormCache",
    "rms_norm_reference",
    "rms_norm_reference_backward",
    "add_rms_norm_reference",
    "add_rms_norm_reference_backward",
    "CASTINGS",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_convention_torch",
    "add_rms_norm",
    "add_rms_norm_torch",
    "RMSNorm",
]


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


class RMSNormCache(NamedTuple):
    """What the forward pass computed that the backward pass (and a curious reader) needs."""

    rstd: np.ndarray  # (*leading, 1, ..., 1): 1 / sqrt(mean(x^2) + eps), reduced axes kept
    x_hat: np.ndarray  # (*leading, *normalized_shape): x * rstd
    axes: tuple[int, ...]  # the normalized (trailing) axes of x


def rms_norm_reference(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, RMSNormCache]:
    r"""RMSNorm in float64 NumPy, written to be read next to its equations.

    For every row x_1..x_m (the trailing ``normalized_shape`` elements of one sample):

    .. math::

        \mathrm{rstd} = \frac{1}{\sqrt{\frac{1}{m}\sum_{j=1}^{m} x_j^2 + \varepsilon}}, \qquad
        \hat{x}_j = x_j\,\mathrm{rstd}, \qquad
        y_j = \gamma_j \hat{x}_j

    with gamma = ``weight`` (absent: 1). The same rstd name as in LayerNorm: 1/RMS plays the role
    of 1/std, the mean being taken as 0. ``eps`` is a number here; the torch op's ``eps=None``
    depends on a dtype the reference does not have (see the module docstring).
    Returns ``(y, cache)``.
    """
    x = np.asarray(x, dtype=np.float64)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))  # the trailing, normalized axes
    mean_square = (x**2).mean(axis=axes, keepdims=True)  # (*leading, 1, ..., 1)
    rstd = 1.0 / np.sqrt(mean_square + eps)
    x_hat = x * rstd  # (*leading, *normalized_shape)
    y = x_hat if weight is None else x_hat * np.asarray(weight, dtype=np.float64)
    return y, RMSNormCache(rstd, x_hat, axes)


def rms_norm_reference_backward(
    dy: np.ndarray, cache: RMSNormCache, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Gradients ``(dx, dweight)`` of :func:`rms_norm_reference`, given dL/dy = ``dy``.

    dweight = sum over rows of dy * x_hat. For dx, write wdy = gamma * dy; rstd depends on every x
    of the row (d rstd / d x_j = -rstd^3 x_j / m), which gives LayerNorm's form without its c2
    term (there is no mean to differentiate through):

    .. math::

        c_1 = \frac{1}{m}\sum_j \hat{x}_j\, wdy_j, \qquad
        dx_j = \mathrm{rstd}\,(wdy_j - \hat{x}_j c_1)

    Subtracting x_hat * c1 removes the component of the gradient along x itself: scaling a row by
    a positive factor leaves its output (nearly, up to eps) unchanged.
    """
    dy = np.asarray(dy, dtype=np.float64)
    x_hat, rstd, row_axes = cache.x_hat, cache.rstd, cache.axes  # row_axes: within one row
    batch_axes = tuple(range(row_axes[0]))  # across rows, for the weight gradient
    dweight = (dy * x_hat).sum(axis=batch_axes)  # normalized_shape
    wdy = dy if weight is None else dy * np.asarray(weight, dtype=np.float64)
    c1 = (x_hat * wdy).mean(axis=row_axes, keepdims=True)  # (*leading, 1, ..., 1)
    dx = (wdy - x_hat * c1) * rstd
    return dx, dweight


def add_rms_norm_reference(
    x: np.ndarray,
    residual: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, RMSNormCache]:
    """The pre-norm residual step h = x + residual, y = rms_norm(h): returns ``(y, h, cache)``."""
    h = np.asarray(x, dtype=np.float64) + np.asarray(residual, dtype=np.float64)
    y, cache = rms_norm_reference(h, normalized_shape, weight, eps)
    return y, h, cache


def add_rms_norm_reference_backward(
    dy: np.ndarray,
    dh: np.ndarray | None,
    cache: RMSNormCache,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dx, dresidual, dweight)`` of :func:`add_rms_norm_reference`.

    h feeds both outputs, so its gradient is the norm's dx plus ``dh`` (the gradient arriving on
    the returned h, None if h was not used); x and residual both receive it unchanged.
    """
    dx, dweight = rms_norm_reference_backward(dy, cache, weight)
    if dh is not None:
        dx = dx + np.asarray(dh, dtype=np.float64)
    return dx, dx.copy(), dweight


# ----------------------------------------------------------------------------------------------
# Functional ops
# ----------------------------------------------------------------------------------------------


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    casting: str = "torch",
    backend: str = "auto",
) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims; see :func:`rms_norm_reference` for the math.

    Same arguments and result as :func:`torch.nn.functional.rms_norm`; ``eps=None`` is the float32
    machine epsilon (float64's for float64 input), as in torch. ``backend`` picks the implementation (see
    :mod:`normlib.backends`), which receives ``normalized_shape`` as a tuple and ``eps`` as a float.
    ``offset`` (the scale is ``offset + weight``; needs a weight) and ``casting`` (``"torch"``,
    ``"llama"`` or ``"gemma"``: where a low-precision result is rounded) select the conventions of
    real models, described in this module's docstring.
    """
    check_input(input, 1, "(*, *normalized_shape)", allow_complex=True)  # complex, as torch's
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    if eps is None:
        eps = RMS_NORM_DEFAULT_EPS[input.dtype]
    else:
        check_eps(eps)
    if casting == "torch" and offset == 0.0:  # checked first: the drop-in call stays cheap
        return resolve("rms_norm", backend, input, weight)(input, shape, weight, eps)
    check_convention(casting, offset, weight is not None)
    if casting != "torch" and input.is_complex():
        raise TypeError(
            f"casting={casting!r} computes a real input in float32; got {input.dtype}: use "
            f"casting='torch' for complex input"
        )
    return _rms_norm_convention(backend, input, shape, weight, eps, offset, casting)


#: The values of ``casting``, each named after the model code it transcribes.
CASTINGS = ("torch", "llama", "gemma")


def check_convention(casting: str, offset: float, has_weight: bool) -> None:
    """``casting`` is one of :data:`CASTINGS`; ``offset`` is a finite real number, nonzero only with a weight."""
    if not isinstance(casting, str) or casting not in CASTINGS:
        raise ValueError(f"casting must be one of {list(CASTINGS)}, got {casting!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a real number (a Python int or float), got {offset!r}")
    if not math.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    if offset != 0.0 and not has_weight:
        raise ValueError(
            f"offset={offset!r} shifts the weight (the scale is offset + weight), but there is no "
            f"weight; pass a weight (elementwise_affine=True for the module) or offset=0.0"
        )


def rms_norm_convention_torch(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
    offset: float,
    casting: str,
) -> Tensor:
    """The "torch" backend with ``offset`` and ``casting``: the operations of the model code each
    convention comes from (torch.nn.RMSNorm, Hugging Face's LlamaRMSNorm and GemmaRMSNorm), in
    their order, so that the results agree bit for bit."""
    if casting == "torch":
        gamma = weight if offset == 0.0 else offset + weight
        return F.rms_norm(input, normalized_shape, gamma, eps)
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    dims = tuple(range(-len(normalized_shape), 0))  # the trailing, normalized dims
    x = input.to(compute)
    x_hat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if casting == "llama":
        y = x_hat.to(input.dtype)  # rounded before the weight multiplies it
        if weight is None:
            return y
        return (weight if offset == 0.0 else offset + weight) * y
    if weight is not None:
        x_hat = x_hat * (offset + weight.to(compute))
    return x_hat.to(input.dtype)  # "gemma": one rounding, at the end


def _rms_norm_convention(
    backend: str,
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
    offset: float,
    casting: str,
) -> Tensor:
    """``backend`` with ``offset`` and ``casting``: the "torch" implementation runs the model code
    (:func:`rms_norm_convention_torch`); a fused one computes with the effective weight, with
    which it is dispatched.

    The kernels compute in float32 (float64 for float64 input) and round once, so "gemma" is their
    own rounding given a weight ``offset + weight`` kept in the compute dtype. For "torch" and
    "llama" the effective weight stays in the weight's dtype, as in the model code; "llama" with a
    weight of another dtype than the input's multiplies outside the kernel so that the result takes
    the promoted dtype, as ``weight * y`` does in the model code.
    """
    gamma, outside = None, None  # the weight the kernel scales by, and one multiplied after it
    if weight is not None and casting == "gemma":
        gamma = offset + weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32)
    elif weight is not None:
        gamma = weight if offset == 0.0 else offset + weight
        if casting == "llama" and gamma.dtype != input.dtype:
            gamma, outside = None, gamma
    # dispatched with the weight it will receive (the C kernels take only the input's dtype)
    function = resolve("rms_norm", backend, input, gamma)
    if function is rms_norm_torch:
        return rms_norm_convention_torch(input, normalized_shape, weight, eps, offset, casting)
    y = function(input, normalized_shape, gamma, eps)
    return y if outside is None else outside * y


def rms_norm_torch(
    input: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
) -> Tensor:
    """The "torch" backend. PyTorch's rms_norm computes float16/bfloat16 inputs in float32 and
    rounds the result back, so nothing needs upcasting here."""
    return F.rms_norm(input, normalized_shape, weight, eps)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The pre-norm Transformer step ``h = input + residual; y = rms_norm(h)``, returning ``(y, h)``.

    h is the new residual stream and y what the block's sublayer reads; fusing saves a full read
    and write of h. ``residual`` must match ``input`` in shape, dtype and device. No
    torch.nn.functional twin exists; the "torch" backend is the unfused pair.
    """
    check_input(input, 1, "(*, *normalized_shape)")
    check_residual(residual, input)
    shape = check_normalized_shape(normalized_shape, input)
    check_tensor_like_input(weight, "weight", input, shape)
    if eps is None:
        eps = RMS_NORM_DEFAULT_EPS[input.dtype]
    else:
        check_eps(eps)
    return resolve("add_rms_norm", backend, input, weight)(input, residual, shape, weight, eps)


def add_rms_norm_torch(
    input: Tensor,
    residual: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The "torch" backend: the unfused add then rms_norm (h rounded to input's dtype in between,
    exactly what an unfused model computes)."""
    h = input + residual
    return F.rms_norm(h, normalized_shape, weight, eps), h


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """A drop-in for torch.nn.RMSNorm whose math runs through :func:`rms_norm` and its backends.

    ``offset`` and ``casting`` select the conventions of real models (see :func:`rms_norm`); with
    an offset the weight starts at ``1 - offset`` (zeros for Gemma's offset of 1), so the layer
    starts as plain RMS scaling. ``RMSNorm(C, eps=1e-6, casting="llama")`` computes what Hugging
    Face's ``LlamaRMSNorm(C)`` does, ``RMSNorm(C, eps=1e-6, offset=1.0, casting="gemma")`` what its
    ``GemmaRMSNorm(C)`` does.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        offset: float = 0.0,
        casting: str = "torch",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        check_convention(casting, offset, elementwise_affine)
        self.offset = float(offset)
        self.casting = casting
        self.normalized_shape = as_normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.constant_(self.weight, 1.0 - self.offset)  # the scale offset + weight starts at 1

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.eps,
            offset=self.offset,
            casting=self.casting,
            backend=self.backend,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles torch.nn.RMSNorm holding this weight (see normlib._autograd);
        the other conventions have no torch.nn twin to compile."""
        if self.offset != 0.0 or self.casting != "torch":
            raise RuntimeError(
                f"torch.jit.script cannot compile RMSNorm with offset={self.offset}, casting={self.casting!r}: "
                f"only offset=0.0, casting='torch' has a TorchScript twin (torch.nn.RMSNorm); use "
                f"torch.jit.trace or torch.compile"
            )
        twin = nn.RMSNorm(self.normalized_shape, self.eps, self.elementwise_affine, device="meta")
        return scriptable_twin(self, twin)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.offset != 0.0:
            text += f", offset={self.offset}"
        if self.casting != "torch":
            text += f", casting={self.casting!r}"
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
