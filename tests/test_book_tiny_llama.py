"""normlib.book.tiny_llama: the model, the captured norm calls and the alternating timer."""

from __future__ import annotations

import pytest
import torch

from normlib.book.tiny_llama import norm_calls, time_alternating, tiny_llama

pytest.importorskip("transformers")


def is_llama_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "LlamaRMSNorm"


def test_tiny_llama_is_deterministic_and_its_norm_weights_are_not_ones():
    first, second = tiny_llama(hidden_size=32, layers=2, vocab_size=64), tiny_llama(hidden_size=32, layers=2, vocab_size=64)
    assert not first.training
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    norm_weights = [p for name, p in first.named_parameters() if name.endswith("norm.weight")]
    assert len(norm_weights) == 2 * 2 + 1
    assert all(not torch.equal(w, torch.ones_like(w)) for w in norm_weights)
    assert tiny_llama(hidden_size=32, layers=1, vocab_size=64, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_norm_calls_are_every_call_in_order_with_the_inputs():
    model = tiny_llama(hidden_size=32, layers=2, vocab_size=64)
    tokens = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    calls = norm_calls(model, tokens, is_llama_norm)
    layers = model.model.layers
    expected = [layers[0].input_layernorm, layers[0].post_attention_layernorm,
                layers[1].input_layernorm, layers[1].post_attention_layernorm, model.model.norm]
    assert [module for module, _ in calls] == expected
    assert all(x.shape == (3, 5, 32) for _, x in calls)
    assert torch.equal(calls[0][1], model.model.embed_tokens(tokens))  # the first norm reads the embeddings
    assert all(not m._forward_pre_hooks for m in model.modules())  # the hooks are removed


def test_time_alternating_runs_each_in_turn_and_returns_medians():
    order = []
    medians = time_alternating({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeat=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        time_alternating({"a": lambda: None}, repeat=0)
