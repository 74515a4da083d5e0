"""QK-norm (Dehghani et al. 2023; Wortsman et al. 2024): normalize queries and keys before their dot product.

In scaled dot-product attention the logit of query i and key j is q_i . k_j / sqrt(hs) (hs = head
size). Nothing bounds it: when training makes the query and key projections large, the logits grow,
the softmax puts all its weight on one key (the attention entropy collapses) and the loss can
diverge. Dehghani et al. (2023) met this when scaling a ViT to 22B parameters and Wortsman et al.
(2024) reproduced it in small models trained at large learning rates; both remove it by applying a
LayerNorm to every query and every key over its hs channels, per head. With RMSNorm instead, the
logit becomes sqrt(hs) times the cosine of the angle between q and k (scaled by the gains), so its
size is bounded by sqrt(hs) * max|gamma_q| * max|gamma_k|.

Both variants normalize the last axis (the head's hs channels) of tensors shaped (..., hs), such as
(B, nh, T, hs), with one gain gamma (and for LayerNorm one shift beta) of hs values shared by all
heads. They run through :func:`normlib.layer_norm` and :func:`normlib.rms_norm`, so the fused
backends apply wherever those ops accept the shape.

This file holds, in reading order: the NumPy reference, the functional op ``qk_norm`` and the module
``QKNorm`` that the book's tiny Transformer (``normlib.book.transformer``) uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from normlib._checks import check_backend_name, check_input
from normlib.layer_norm import LayerNorm, layer_norm, layer_norm_reference
from normlib.rms_norm import RMSNorm, rms_norm, rms_norm_reference

__all__ = ["QK_NORMS", "qk_norm_reference", "qk_norm", "QKNorm"]

QK_NORMS = ("layer", "rms")


def _check_kind(kind: str) -> None:
    if kind not in QK_NORMS:
        raise ValueError(f"kind must be one of {QK_NORMS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# NumPy reference
# ----------------------------------------------------------------------------------------------


def qk_norm_reference(
    q: np.ndarray,
    k: np.ndarray,
    kind: str = "layer",
    q_weight: np.ndarray | None = None,
    k_weight: np.ndarray | None = None,
    q_bias: np.ndarray | None = None,
    k_bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    r"""QK-norm in float64 NumPy: ``(q_hat, k_hat)``, each row of hs channels normalized on its own.

    For ``kind="layer"``, with mean and var over the hs channels of one query (one head, one token):

    .. math::

        \hat{q}_j = \gamma^{q}_j\,\frac{q_j - \mathrm{mean}(q)}{\sqrt{\mathrm{var}(q) + \varepsilon}}
        + \beta^{q}_j,

    for ``kind="rms"``, :math:`\hat{q}_j = \gamma^{q}_j\,q_j / \sqrt{\frac{1}{hs}\sum_i q_i^2 + \varepsilon}`
    (no shift), and the same for k with its own gamma and beta. The attention logits are then
    :math:`\hat{q}\cdot\hat{k} / \sqrt{hs}`. Biases are LayerNorm's only.
    """
    _check_kind(kind)
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if q.shape[-1:] != k.shape[-1:]:
        raise ValueError(f"q and k must share their last axis (the head size), got {q.shape} and {k.shape}")
    hs = q.shape[-1]
    if kind == "layer":
        q_hat, _ = layer_norm_reference(q, hs, q_weight, q_bias, eps)
        k_hat, _ = layer_norm_reference(k, hs, k_weight, k_bias, eps)
    else:
        if q_bias is not None or k_bias is not None:
            raise ValueError("q_bias and k_bias must be None for kind='rms' (RMSNorm has no shift)")
        q_hat, _ = rms_norm_reference(q, hs, q_weight, eps)
        k_hat, _ = rms_norm_reference(k, hs, k_weight, eps)
    return q_hat, k_hat


# ----------------------------------------------------------------------------------------------
# functional op
# ----------------------------------------------------------------------------------------------


def qk_norm(
    q: Tensor,
    k: Tensor,
    kind: str = "layer",
    q_weight: Tensor | None = None,
    k_weight: Tensor | None = None,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Queries and keys, each normalized over its last axis (hs channels); see :func:`qk_norm_reference`.

    ``q`` is (..., hs) and ``k`` is (..., hs), for example (B, nh, T, hs) each; their leading axes may
    differ (queries and keys of different lengths). ``eps=None`` takes each norm's own default: 1e-5
    for LayerNorm, the dtype's machine epsilon for RMSNorm (as :func:`normlib.rms_norm`).
    ``backend`` is passed on to :func:`normlib.layer_norm` or :func:`normlib.rms_norm`.
    """
    _check_kind(kind)
    check_input(q, 1, "(..., hs)")
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    if q.shape[-1:] != k.shape[-1:]:
        raise ValueError(
            f"q and k must share their last axis (the head size), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    hs = q.shape[-1]
    if kind == "layer":
        eps = 1e-5 if eps is None else eps
        q_hat = layer_norm(q, hs, q_weight, q_bias, eps, backend=backend)
        k_hat = layer_norm(k, hs, k_weight, k_bias, eps, backend=backend)
        return q_hat, k_hat
    if q_bias is not None or k_bias is not None:
        raise ValueError("q_bias and k_bias must be None for kind='rms' (RMSNorm has no shift)")
    return rms_norm(q, hs, q_weight, eps, backend=backend), rms_norm(k, hs, k_weight, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


class QKNorm(nn.Module):
    """One norm for the queries and one for the keys of an attention layer, each over hs channels.

    ``forward(q, k)`` returns the normalized pair. The parameters are the two norms' own
    (``q_norm.weight``, ``k_norm.weight`` and, for LayerNorm, the biases), of hs values each and
    shared by the heads; they start at gamma = 1, beta = 0, so a fresh QKNorm only standardizes.
    """

    def __init__(
        self,
        head_size: int,
        kind: str = "layer",
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        _check_kind(kind)
        if not isinstance(head_size, int) or head_size < 1:
            raise ValueError(f"head_size must be a positive int, got {head_size!r}")
        check_backend_name(backend)
        self.kind = kind
        if kind == "layer":
            eps = 1e-5 if eps is None else eps
            self.q_norm = LayerNorm(head_size, eps, elementwise_affine, backend=backend)
            self.k_norm = LayerNorm(head_size, eps, elementwise_affine, backend=backend)
        else:
            self.q_norm = RMSNorm(head_size, eps, elementwise_affine, backend=backend)
            self.k_norm = RMSNorm(head_size, eps, elementwise_affine, backend=backend)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:  # (..., hs) each
        if q.shape[-1:] != k.shape[-1:]:
            raise ValueError(
                f"q and k must share their last axis (the head size), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
            )
        return self.q_norm(q), self.k_norm(k)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
