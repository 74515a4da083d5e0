"""Per-layer statistics of a network: how large its activations and its gradients are, layer by layer.

Chapter 1 uses this to see what normalization changes in a deep network. One call of
:func:`layer_statistics` runs one forward and one backward pass on a batch and reports, for each
watched layer, the mean and standard deviation of its output, and for each weight matrix the norm
of the loss gradient with respect to it. Vanishing or exploding gradients show up directly as
gradient norms that shrink or grow by orders of magnitude from the last layer to the first.

Forward hooks capture the outputs; the gradients are taken with :func:`torch.autograd.grad`
instead of ``loss.backward()`` so that measuring never touches the ``.grad`` fields an optimizer
is about to use.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["LayerStatistics", "layer_outputs", "layer_statistics"]


@dataclass(frozen=True)
class LayerStatistics:
    """What :func:`layer_statistics` measured, one array entry per layer, from input to output.

    ``activation_*`` have one entry per watched module (for ``DeepMLP``, each block's ReLU);
    ``weight_grad_norm`` has one per weight-carrying module (for ``DeepMLP``, each Linear,
    the classifier head last).
    """

    activation_mean: np.ndarray  # (L_watched,) mean over the batch and all features
    activation_std: np.ndarray  # (L_watched,) standard deviation over the batch and all features
    activation_grad_norm: np.ndarray  # (L_watched,) Frobenius norm of dloss/d(output), whole batch
    weight_grad_norm: np.ndarray  # (L_weights,) Frobenius norm of dloss/d(weight)
    loss: float


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer back as it was on exit.

    BatchNorm in training mode updates its running statistics on every forward pass; a
    measurement must leave them as they were.
    """
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


def _modules_of_type(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def layer_statistics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    watch: type[nn.Module] | tuple[type[nn.Module], ...] = nn.ReLU,
    weights_of: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
) -> LayerStatistics:
    """One forward and backward pass of ``model`` on ``(x, y)`` with cross-entropy, measured per layer.

    ``watch`` selects the modules whose outputs are measured (in the order ``model.modules()``
    visits them, which for a sequential model is depth order); ``weights_of`` selects the modules
    whose ``weight`` gradient norm is measured. The model stays in the mode it is in, so a
    BatchNorm in training mode normalizes with the batch's statistics, as during training; its
    running statistics are restored afterwards, so measuring does not change the model.
    """
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be a batch (N, ...) and y its labels (N,); got x of shape {tuple(x.shape)} "
            f"and y of shape {tuple(y.shape)}"
        )
    watched = _modules_of_type(model, watch)
    weighted = [m for m in _modules_of_type(model, weights_of) if getattr(m, "weight", None) is not None]
    if not watched:
        raise ValueError(f"watch={watch!r}: the model has no module of that type")
    if not weighted:
        raise ValueError(f"weights_of={weights_of!r}: the model has no module of that type with a weight")

    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, output: outputs.append(output)) for m in watched]
    try:
        with _buffers_restored(model), torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y)
            weights = [m.weight for m in weighted]
            grads = torch.autograd.grad(loss, outputs + weights)
    finally:
        for handle in handles:
            handle.remove()

    if len(outputs) != len(watched):
        raise RuntimeError(
            f"expected each watched module to run once per forward pass, but {len(watched)} modules "
            f"produced {len(outputs)} outputs (is a module reused?)"
        )
    activation_grads, weight_grads = grads[: len(outputs)], grads[len(outputs) :]
    # float64 for the reductions: with vanishing gradients the values span many orders of magnitude
    return LayerStatistics(
        activation_mean=np.array([o.detach().double().mean().item() for o in outputs]),
        activation_std=np.array([o.detach().double().std().item() for o in outputs]),
        activation_grad_norm=np.array([g.double().norm().item() for g in activation_grads]),
        weight_grad_norm=np.array([g.double().norm().item() for g in weight_grads]),
        loss=loss.item(),
    )


@torch.no_grad()
def layer_outputs(
    model: nn.Module,
    x: torch.Tensor,
    *,
    watch: type[nn.Module] | tuple[type[nn.Module], ...] = nn.ReLU,
) -> list[torch.Tensor]:
    """The outputs of every ``watch`` module (depth order) for input ``x``, one tensor each.

    Runs in the mode the model is in and leaves its buffers (BatchNorm's running statistics) as
    they were, like :func:`layer_statistics`; use it for per-feature statistics that the summary
    numbers of :func:`layer_statistics` average away.
    """
    watched = _modules_of_type(model, watch)
    if not watched:
        raise ValueError(f"watch={watch!r}: the model has no module of that type")
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, output: outputs.append(output)) for m in watched]
    try:
        with _buffers_restored(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs
