"""Swap the normalization layers of an existing model for normlib's: :func:`convert_norms`.

A model built with ``torch.nn`` (or loaded with Hugging Face ``transformers``) keeps its own code;
only its norm layers change class. Each replacement takes over the very parameter and buffer
objects of the layer it replaces, so devices, dtypes, values, weight tying and an optimizer that
already holds the parameters are all unaffected, and the train/eval state is kept.

What is replaced (exact classes only: a subclass may have changed ``forward``, so it is left as
it is):

- ``torch.nn.LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``,
  ``InstanceNorm1d/2d/3d`` and ``SyncBatchNorm``, by the normlib class of the same name (where
  normlib has it);
- with ``transformers=True``, the RMSNorm classes of ``transformers``' Llama, Mistral and Qwen2
  models (``casting="llama"``) and of Gemma (``offset=1.0, casting="gemma"``), by
  :class:`~normlib.rms_norm.RMSNorm` with the convention their code computes (see :mod:`normlib.rms_norm`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import normlib
from normlib._checks import check_backend_name
from normlib.backends import IMPLEMENTATIONS

__all__ = ["TORCH_TWINS", "TRANSFORMERS_RMS_NORMS", "convert_norms"]

# torch.nn class name -> the op its normlib twin runs (for the backends that implement it)
_OPS = {
    "LayerNorm": "layer_norm",
    "RMSNorm": "rms_norm",
    "GroupNorm": "group_norm",
    **{f"BatchNorm{d}d": "batch_norm" for d in (1, 2, 3)},
    **{f"InstanceNorm{d}d": "instance_norm" for d in (1, 2, 3)},
    "SyncBatchNorm": "batch_norm",
}


def _running_stats_twin(name: str, *extra: str) -> Callable[[nn.Module, str], nn.Module]:
    """How to build normlib's ``name`` (a BatchNorm or InstanceNorm) from its torch.nn twin: the
    shared arguments, then the attributes ``extra`` (SyncBatchNorm's process_group)."""

    def build(m: nn.Module, backend: str) -> nn.Module:
        return getattr(normlib, name)(
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
            *(getattr(m, attribute) for attribute in extra),
            device="meta", bias=m.bias is not None, backend=backend,
        )

    return build


#: torch.nn class name -> how to build its normlib twin from it. The twin is built on the meta
#: device, because its own tensors are replaced by the original's at once.
TORCH_TWINS: dict[str, Callable[[nn.Module, str], nn.Module]] = {
    "LayerNorm": lambda m, backend: normlib.LayerNorm(
        m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None, device="meta", backend=backend
    ),
    "RMSNorm": lambda m, backend: normlib.RMSNorm(
        m.normalized_shape, m.eps, m.elementwise_affine, device="meta", backend=backend
    ),
    "GroupNorm": lambda m, backend: normlib.GroupNorm(
        m.num_groups, m.num_channels, m.eps, m.affine, device="meta", bias=m.bias is not None, backend=backend
    ),
    **{
        name: _running_stats_twin(name)
        for name in (
            "BatchNorm1d",
            "BatchNorm2d",
            "BatchNorm3d",
            "InstanceNorm1d",
            "InstanceNorm2d",
            "InstanceNorm3d",
        )
    },
    "SyncBatchNorm": _running_stats_twin("SyncBatchNorm", "process_group"),
}

#: "module.ClassName" of a transformers RMSNorm -> (casting, offset, attribute holding its eps).
#: Their forward code is transcribed in tests/test_rms_conventions.py and compared with these
#: classes themselves in tests/test_convert.py, so a transformers release that changes one fails there.
TRANSFORMERS_RMS_NORMS: dict[str, tuple[str, float, str]] = {
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": ("llama", 0.0, "variance_epsilon"),
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": ("llama", 0.0, "variance_epsilon"),
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": ("llama", 0.0, "variance_epsilon"),
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": ("gemma", 1.0, "eps"),
}

# The hooks a user registers on a layer; they move to its replacement (the handles stay valid
# because the dictionaries themselves move).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def convert_norms(model: nn.Module, backend: str = "auto", *, transformers: bool = True) -> nn.Module:
    """Replace every normalization layer of ``model`` that normlib has a twin for; returns the model.

    ``model`` itself is changed (its children are replaced) and returned; if ``model`` is itself a
    norm layer, its replacement is returned. Every replacement runs with ``backend`` (see
    :mod:`normlib.backends`), or with ``"auto"`` where its op has no implementation in that
    backend (``backend="cpu"`` gives the RMSNorms normlib's CPU kernel and leaves the other
    norms to "auto"). Each holds the original's parameters and buffers (the same tensor
    objects), its train/eval state and its forward and backward hooks. A layer shared by several
    parents stays shared. ``transformers`` also replaces the RMSNorm classes of Hugging Face
    Llama, Mistral, Qwen2 and Gemma models (:data:`TRANSFORMERS_RMS_NORMS`); ``transformers``
    itself is never imported here.

    Example::

        model = transformers.AutoModelForCausalLM.from_pretrained(name)
        model = normlib.convert_norms(model)  # same logits, normlib's fused kernels
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    if not isinstance(transformers, bool):
        raise TypeError(f"transformers must be True or False, got {transformers!r}")
    return _convert(model, backend, transformers, {})


def _convert(module: nn.Module, backend: str, transformers: bool, done: dict[int, nn.Module]) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    twin = _twin(module, backend, transformers)
    if twin is not None:
        done[id(module)] = twin
        return twin
    for name, child in list(module._modules.items()):  # not named_children(): it skips repeats
        if child is None:
            continue
        replacement = _convert(child, backend, transformers, done)
        if replacement is not child:
            setattr(module, name, replacement)
    done[id(module)] = module
    return module


def _twin(module: nn.Module, backend: str, transformers: bool) -> nn.Module | None:
    """The normlib layer that replaces ``module``, or None if it stays."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn.") and cls.__name__ in TORCH_TWINS and hasattr(normlib, cls.__name__):
        implemented = backend == "auto" or backend in IMPLEMENTATIONS[_OPS[cls.__name__]]
        twin = TORCH_TWINS[cls.__name__](module, backend if implemented else "auto")
    elif transformers and f"{cls.__module__}.{cls.__qualname__}" in TRANSFORMERS_RMS_NORMS:
        casting, offset, eps_attribute = TRANSFORMERS_RMS_NORMS[f"{cls.__module__}.{cls.__qualname__}"]
        twin = normlib.RMSNorm(
            tuple(module.weight.shape),
            eps=getattr(module, eps_attribute),
            device="meta",
            offset=offset,
            casting=casting,
            backend=backend,
        )
    else:
        return None
    _take_state(module, twin)
    return twin


def _take_state(original: nn.Module, twin: nn.Module) -> None:
    """Give ``twin`` the parameters, buffers, mode and hooks of ``original`` (the same objects)."""
    for kind in ("_parameters", "_buffers"):
        ours, theirs = getattr(twin, kind), getattr(original, kind)
        if set(ours) != set(theirs):
            raise RuntimeError(
                f"cannot replace {type(original).__name__} by {type(twin).__name__}: its {kind[1:]} "
                f"are {sorted(theirs)}, the replacement's {sorted(ours)}"
            )
        ours.update(theirs)
    twin._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    for hooks in _HOOK_DICTS:
        if hasattr(original, hooks):
            setattr(twin, hooks, getattr(original, hooks))
    if hasattr(original, "_is_full_backward_hook"):
        twin._is_full_backward_hook = original._is_full_backward_hook
    twin.train(original.training)
