"""A tiny Llama for chapter 5's demo of :func:`normlib.convert_norms`, and how its norms are timed.

The model is Hugging Face ``transformers``' ``LlamaForCausalLM`` built from a configuration in code,
with random weights: nothing is downloaded. Its RMSNorm weights, which ``transformers`` initializes
to exactly 1, get random values as a trained model's have, because with a weight of ones the
rounding conventions of :mod:`normlib.rms_norm` give identical results.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["tiny_llama", "norm_calls", "time_alternating"]


def tiny_llama(
    hidden_size: int = 256, layers: int = 4, vocab_size: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` in eval mode (``transformers`` must be installed)."""
    with warnings.catch_warnings():
        # transformers imports tqdm's notebook progress bars, which warn without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # no end token: a greedy continuation runs its full length
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, model.norm
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.to(dtype)


def norm_calls(model: nn.Module, tokens: torch.Tensor, is_norm: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every call of a norm layer in one forward pass of ``model`` on ``tokens``: ``(layer, input)``
    pairs in call order, so that the norms alone can be timed on the activations they really see."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: calls.append((module, args[0])))
        for module in model.modules()
        if is_norm(module)
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def time_alternating(functions: dict[str, Callable[[], object]], repeat: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, the functions run in turn ``repeat`` times.

    Taking turns makes a busy moment of the machine slow them all alike instead of one of them;
    the medians are compared as ratios within one run.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeat):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}
