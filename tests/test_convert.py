"""normlib.convert_norms: every norm layer swapped, nothing else about the model changed.

The transformers models are tiny and randomly initialized from a config written here (nothing is
downloaded); their norm weights are randomized too, so that a wrong convention (a missing offset,
a rounding in the wrong place) changes the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlib
from normlib.backends import IMPLEMENTATIONS
from normlib.convert import _OPS, TRANSFORMERS_RMS_NORMS

BACKENDS = normlib.available_backends("rms_norm", "cpu")
FAST_BACKENDS = [name for name in BACKENDS if name != "triton"]  # the interpreter is too slow for models


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and running statistics, so that every norm's state matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                positive = tensor.data.abs().mean() > 0.5  # weights near 1 and running variances
                tensor.copy_(noise.abs() * 0.5 + 0.5 if positive else noise * 0.3)
    return model


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.GroupNorm(2, 8),
            nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
            nn.Conv2d(8, 8, 1),
        )
        self.volume = nn.Sequential(nn.Conv3d(1, 4, 1), nn.BatchNorm3d(4, momentum=None), nn.InstanceNorm3d(4))
        self.sequence = nn.Sequential(
            nn.Linear(8, 16),
            nn.LayerNorm(16),
            nn.RMSNorm(16, eps=1e-6),
            nn.BatchNorm1d(5),
            nn.InstanceNorm1d(5, affine=True),
            nn.LayerNorm(16, bias=False),
            nn.GroupNorm(5, 5, affine=False),
        )

    def forward(self, image: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        features = self.image(image).mean(dim=(2, 3))  # (N, 8)
        sequence = self.sequence(features.unsqueeze(1).expand(-1, 5, -1))  # (N, 5, 16)
        return sequence.sum(dim=(1, 2)) + self.volume(volume).sum(dim=(1, 2, 3, 4))


def inputs(seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(4, 3, 6, 6, generator=generator).to(dtype),
        torch.randn(4, 1, 3, 3, 3, generator=generator).to(dtype),
    )


def norm_classes(model: nn.Module) -> list[str]:
    return [
        f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
        for m in model.modules()
        if "Norm" in type(m).__name__
    ]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_torch_norms_are_swapped_and_compute_the_same(backend, training):
    torch.manual_seed(0)
    original = randomize(ConvNet().double()).train(training)
    original.image[1].eval()  # mixed modes: one BatchNorm already frozen
    model = copy.deepcopy(original)
    state_before = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    modes_before = {name: m.training for name, m in model.named_modules()}

    converted = normlib.convert_norms(model, backend)

    assert converted is model
    assert all(name.startswith("normlib.") for name in norm_classes(model)), norm_classes(model)
    assert len(norm_classes(model)) == len(norm_classes(original)) == 11
    state_after = model.state_dict(keep_vars=True)
    assert list(state_after) == list(state_before)  # same keys, same order
    assert all(state_after[name] is tensor for name, tensor in state_before.items())  # same objects
    assert {name: m.training for name, m in model.named_modules()} == modes_before
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for module in model.modules():  # the backend asked for, where the layer's op has it
        if type(module).__name__ in _OPS:
            op = IMPLEMENTATIONS[_OPS[type(module).__name__]]
            assert module.backend == (backend if backend in op else "auto"), type(module)
    assert model.sequence[2].backend == backend  # RMSNorm: every backend

    image, volume = inputs(dtype=torch.float64)
    results = []
    for net in (original, model):
        out = net(image, volume)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in net.parameters()], [b.clone() for b in net.buffers()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    for ours, theirs in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    for ours, theirs in zip(results[1][2], results[0][2]):  # running statistics updated alike
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_device_sharing_hooks_and_what_stays():
    shared = nn.LayerNorm(4)

    class MyLayerNorm(nn.LayerNorm):  # a subclass may compute something else: left alone
        pass

    model = nn.Sequential(shared, nn.Linear(4, 4), shared, MyLayerNorm(4)).to("meta")
    calls = []
    shared.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    normlib.convert_norms(model)
    assert model[0] is model[2] and isinstance(model[0], normlib.LayerNorm)
    assert type(model[3]) is MyLayerNorm
    assert model[0].weight.device.type == "meta"
    model(torch.zeros(2, 4, device="meta"))
    assert calls == ["LayerNorm", "LayerNorm"]  # the hook moved with the layer, which is normlib's
    calls.clear()
    single = nn.LayerNorm(4)
    single.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    replaced = normlib.convert_norms(single)  # a norm passed directly: its replacement is returned
    assert isinstance(replaced, normlib.LayerNorm) and replaced.weight is single.weight
    replaced(torch.randn(2, 4))
    assert calls == ["LayerNorm"] and type(replaced).__module__ == "normlib.layer_norm"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(model="model"), TypeError, "model must be a torch.nn.Module"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(transformers="yes"), TypeError, "transformers must be True or False"),
    ],
)
def test_bad_arguments_raise(kwargs, error, words):
    arguments = dict(model=nn.LayerNorm(4)) | kwargs
    with pytest.raises(error, match=words):
        normlib.convert_norms(arguments.pop("model"), **arguments)


# ---- transformers ----------------------------------------------------------------------------


def tiny_causal_lm(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    }[family]
    config = config_class(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # HF initializes them to exactly 1 (Gemma: 0); make them matter
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.to(dtype)


def hf_norm_count(model: nn.Module) -> int:
    return sum(f"{type(m).__module__}.{type(m).__qualname__}" in TRANSFORMERS_RMS_NORMS for m in model.modules())


PROMPT = torch.tensor([[1, 17, 42, 5, 63, 8, 29, 71]])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_transformers_bf16_torch_backend_is_bit_for_bit(family):
    original = tiny_causal_lm(family, torch.bfloat16)
    model = normlib.convert_norms(copy.deepcopy(original), backend="torch")
    assert hf_norm_count(original) == 5 and hf_norm_count(model) == 0
    norms = [m for m in model.modules() if isinstance(m, normlib.RMSNorm)]
    assert len(norms) == 5
    assert {(m.casting, m.offset) for m in norms} == {("gemma", 1.0) if family == "gemma" else ("llama", 0.0)}
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, original(PROMPT).logits)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_transformers_logits_gradients_and_tokens(family, backend):
    original = tiny_causal_lm(family)
    model = normlib.convert_norms(copy.deepcopy(original), backend)
    assert hf_norm_count(model) == 0
    results = []
    for net in (original, model):
        logits = net(PROMPT).logits
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), {name: p.grad for name, p in net.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[1][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        settings = dict(max_new_tokens=12, do_sample=False)
        tokens = original.generate(PROMPT, **settings)
        assert tokens.shape[1] > PROMPT.shape[1]
        assert torch.equal(model.generate(PROMPT, **settings), tokens)


def test_transformers_false_leaves_them():
    model = normlib.convert_norms(tiny_causal_lm("llama"), transformers=False)
    assert hf_norm_count(model) == 5


def test_bf16_auto_backend_within_rounding():
    """On the fused path the logits of a bfloat16 model move by rounding differences only."""
    original = tiny_causal_lm("llama", torch.bfloat16)
    model = normlib.convert_norms(copy.deepcopy(original))
    with torch.no_grad():
        ours, theirs = model(PROMPT).logits.float(), original(PROMPT).logits.float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()


def test_sync_batch_norm_keeps_its_process_group_and_state():
    original = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, momentum=0.3))).eval()
    model = normlib.convert_norms(copy.deepcopy(original))
    assert type(model[1]) is normlib.SyncBatchNorm and model[1].process_group is None
    assert model[1].momentum == 0.3 and not model[1].training
    image = inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(model(image), original(image), rtol=1e-6, atol=1e-6)
