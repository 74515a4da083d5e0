"""What the fused backends ("cpu", "triton") share so that autograd's tools give PyTorch's answers.

A fused kernel is opaque to the parts of PyTorch that look inside an op: torch.func's transforms
(``grad``, ``jacrev``, ``vmap``) see no batched or wrapped tensor inside a C or Triton kernel,
``torch.jit.trace`` cannot record what a C extension does (it would record an empty output and
replay uninitialized memory), and the kernels' backward passes are themselves not differentiable.
So

* while a torch.func transform is active or ``torch.jit.trace`` is recording, normlib.backends runs
  the op's "torch" implementation instead of a fused one (one rule for every op, in
  ``normlib.backends.resolve``), and
* the fused backends answer a backward with ``create_graph=True`` (double backward: gradient
  penalties, Hessian-vector products) with :func:`double_backward`, which differentiates the
  PyTorch composite below.

On the ordinary path this costs a few flag checks per call; the recomputation runs only when a
graph of the backward is asked for.

``torch.jit.script`` cannot compile the dispatch to backends (keyword-only arguments, runtime
checks with f-strings), so each normlib module offers TorchScript its torch.nn twin instead
(``__prepare_scriptable__``, through :func:`scriptable_twin`), holding the very same parameters and
buffers: the scripted model computes with PyTorch's ops what the normlib model computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "scriptable_twin",
    "double_backward",
    "add_norm_double_backward",
    "rms_norm_composite",
    "layer_norm_composite",
]


def double_backward(
    recompute: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Tensor | None],
    grad_outputs: Sequence[Tensor | None],
    needs_input_grad: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``recompute(*inputs)`` for a backward with ``create_graph=True``.

    Recomputing the forward with PyTorch's ops and differentiating it with create_graph=True
    records a graph that reaches the inputs, the parameters and the incoming gradients
    ``grad_outputs`` (None for an output that received no gradient), so every further derivative
    is PyTorch's own. ``inputs`` must be the tensors the forward received (saved with
    ``save_for_backward``, which keeps their history). Returns one gradient (or None) per input.
    """
    wanted = [i for i, (tensor, need) in enumerate(zip(inputs, needs_input_grad)) if need and tensor is not None]
    grads: list[Tensor | None] = [None] * len(inputs)
    with torch.enable_grad():
        # Differentiate at aliases: asked for the gradient of a parameter itself, the engine would
        # also walk from a saved output (h) back through the node whose backward is running, and
        # run that node again from inside its own backward.
        inputs = [None if t is None else t.view_as(t) if t.requires_grad else t for t in inputs]
        outputs = recompute(*inputs)
        used = [(output, grad) for output, grad in zip(outputs, grad_outputs) if grad is not None]
        if not wanted or not used:
            return grads
        found = torch.autograd.grad(
            [output for output, _ in used],
            [inputs[i] for i in wanted],
            [grad for _, grad in used],
            create_graph=True,
            allow_unused=True,
        )
    for i, grad in zip(wanted, found):
        grads[i] = grad
    return grads


def add_norm_double_backward(
    norm: Callable[..., Tensor],
    h: Tensor,
    parameters: Sequence[Tensor | None],
    dy: Tensor | None,
    dh: Tensor | None,
    needs_parameter_grad: Sequence[bool],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """:func:`double_backward` for the fused ``(y, h) = (norm(h), h)`` with ``h = input + residual``.

    It differentiates ``norm`` at the saved *output* h rather than at input and residual, so that
    the fused op need not keep input and residual alive until the backward (PyTorch's unfused pair
    keeps only h): h's own graph leads back to both. Returns the gradient of h, which input and
    residual both receive, and one gradient (or None) per parameter.
    """
    dh_norm, *parameter_grads = double_backward(
        lambda h_, *p: (norm(h_, *p),), (h, *parameters), (dy,), (h.requires_grad, *needs_parameter_grad)
    )
    if dh is not None:
        dh_norm = dh if dh_norm is None else dh_norm + dh
    return dh_norm, parameter_grads


def rms_norm_composite(
    input: Tensor, weight: Tensor | None, shape: tuple[int, ...], eps: float
) -> tuple[Tensor]:
    return (F.rms_norm(input, shape, weight, eps),)


def layer_norm_composite(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, shape: tuple[int, ...], eps: float
) -> tuple[Tensor]:
    return (F.layer_norm(input, shape, weight, bias, eps),)


def scriptable_twin(module: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin``, a torch.nn module built (on the meta device) with ``module``'s arguments, given
    ``module``'s own parameters and buffers (shared, not copied) and its train/eval mode."""
    for name, parameter in module._parameters.items():
        twin._parameters[name] = parameter
    for name, buffer in module._buffers.items():
        twin._buffers[name] = buffer
    return twin.train(module.training)
