"""RMSNorm's conventions (``offset``, ``casting``) against the model code they come from.

Each reference below is a plain-PyTorch transcription of a model's RMSNorm forward: torch.nn.RMSNorm
("torch"), Hugging Face transformers' LlamaRMSNorm ("llama", also Mistral's and Qwen2's) and
GemmaRMSNorm ("gemma"). In bfloat16 and float16 the "torch" backend must agree with them bit for
bit; the fused backends ("cpu", and "triton" under the interpreter) within one unit in the last
place of the output dtype, counted as the number of representable values between the two results.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import normlib
from normlib.rms_norm import rms_norm_reference

LOW_PRECISION = [torch.bfloat16, torch.float16]
BACKENDS = normlib.available_backends("rms_norm", "cpu")
KERNEL_BACKENDS = [name for name in BACKENDS if name != "torch"]
EPS = 1e-6
WIDTH = 48


def torch_reference(x, weight, eps, offset=0.0):
    """torch.nn.RMSNorm with the scale offset + weight."""
    return F.rms_norm(x, (x.shape[-1],), offset + weight, eps)


def llama_reference(hidden_states, weight, eps, offset=0.0):
    """transformers' LlamaRMSNorm.forward, with the scale offset + weight."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return (offset + weight) * hidden_states.to(input_dtype)


def gemma_reference(x, weight, eps, offset=1.0):
    """transformers' GemmaRMSNorm.forward (its 1.0 is the offset)."""
    output = x.float()
    output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + eps)
    output = output * (offset + weight.float())
    return output.type_as(x)


REFERENCES = {"torch": torch_reference, "llama": llama_reference, "gemma": gemma_reference}


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many representable values of the (16-bit) dtype lie between actual and expected."""
    assert actual.dtype == expected.dtype and actual.dtype in LOW_PRECISION

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)  # sign-magnitude to a number line

    return (ordered(actual) - ordered(expected)).abs()


def sample(dtype: torch.dtype, casting: str, seed: int = 0, rows: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different scales, and a weight as the convention initializes it plus noise."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, rows).unsqueeze(1)  # (rows, 1)
    x = (torch.randn(rows, WIDTH, generator=generator) * scales).to(dtype)
    center = 0.0 if casting == "gemma" else 1.0
    weight = (center + 0.5 * torch.randn(WIDTH, generator=generator)).to(dtype)
    return x, weight


@pytest.mark.parametrize("offset", [0.0, 1.0, -0.375])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("casting", ["torch", "llama", "gemma"])
def test_torch_backend_is_bit_for_bit(casting, dtype, offset):
    for seed in range(3):
        x, weight = sample(dtype, casting, seed)
        expected = REFERENCES[casting](x, weight, EPS, offset)
        actual = normlib.rms_norm(x, WIDTH, weight, EPS, offset=offset, casting=casting, backend="torch")
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected), (casting, dtype, offset, seed)


def interpreter_truncates(dtype: torch.dtype) -> bool:
    """Whether Triton's interpreter rounds float32 toward zero when storing ``dtype``.

    It emulates bfloat16 by cutting off the low 16 bits of a float32 (round to nearest is what a
    GPU does, and what torch does), so every bfloat16 value a kernel stores under the interpreter
    may be one unit below the correctly rounded one, on top of the convention's own rounding.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def store(source, target, n: tl.constexpr):
        columns = tl.arange(0, n)
        tl.store(target + columns, tl.load(source + columns).to(target.dtype.element_ty))

    values = torch.randn(256, generator=torch.Generator().manual_seed(0))
    stored = torch.empty(256, dtype=dtype)
    store[(1,)](values, stored, 256)
    truncated = (values.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return not torch.equal(stored, values.to(dtype)) and torch.equal(stored, truncated)


def allowed_ulps(backend: str, dtype: torch.dtype) -> int:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and interpreter_truncates(dtype):
        return 2
    return 1


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("casting", ["torch", "llama", "gemma"])
def test_kernels_within_one_ulp(casting, dtype, offset, backend):
    worst = 0
    for seed in range(3):
        x, weight = sample(dtype, casting, seed)
        expected = REFERENCES[casting](x, weight, EPS, offset)
        actual = normlib.rms_norm(x, WIDTH, weight, EPS, offset=offset, casting=casting, backend=backend)
        assert actual.dtype == expected.dtype
        worst = max(worst, int(ulp_distance(actual, expected).max()))
    assert worst <= allowed_ulps(backend, dtype), f"{casting} on {backend} in {dtype}: {worst} ulps from the reference"


def test_conventions_differ_where_expected():
    """The references are not all one function: llama's double rounding differs in bf16, so the
    bit-for-bit test above distinguishes the conventions; in float32 input all three agree."""
    x, weight = sample(torch.bfloat16, "llama")
    llama = llama_reference(x, weight, EPS)
    assert not torch.equal(llama, torch_reference(x, weight, EPS))
    assert int(ulp_distance(llama, torch_reference(x, weight, EPS)).max()) == 1
    x32, weight32 = x.float(), weight.float()
    for casting in ("llama", "gemma"):
        y = normlib.rms_norm(x32, WIDTH, weight32, EPS, casting=casting, backend="torch")
        torch.testing.assert_close(y, torch_reference(x32, weight32, EPS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_weight_of_another_dtype_promotes(backend):
    """A float32 weight on bfloat16 activations: the model code's weight * y is float32."""
    x, weight = sample(torch.bfloat16, "llama")
    weight = weight.float() + 1e-3  # not representable in bfloat16
    expected = llama_reference(x, weight, EPS)
    actual = normlib.rms_norm(x, WIDTH, weight, EPS, casting="llama", backend=backend)
    assert actual.dtype == expected.dtype == torch.float32
    if backend == "torch":
        assert torch.equal(actual, expected)
    else:  # the normalized x may differ by one bfloat16 ulp, then is multiplied by the weight
        assert int(ulp_distance(actual.div(weight).bfloat16(), expected.div(weight).bfloat16()).max()) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", ["torch", "llama", "gemma"])
def test_float64_is_computed_in_float64(casting, backend):
    if backend == "triton":
        pytest.skip("the Triton kernels compute in float32")
    x, weight = sample(torch.float64, casting)
    offset = 1.0 if casting == "gemma" else 0.0
    expected, _ = rms_norm_reference(x.numpy(), WIDTH, (offset + weight).numpy(), EPS)
    actual = normlib.rms_norm(x, WIDTH, weight, EPS, offset=offset, casting=casting, backend=backend)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", ["torch", "llama", "gemma"])
def test_trailing_dims_and_no_weight(casting, backend):
    """normalized_shape of two dims reduces over both, as over the flattened row; no weight, no scale."""
    x, weight = sample(torch.bfloat16, casting)
    x3 = x.reshape(x.shape[0], 6, 8)
    offset = 1.0 if casting == "gemma" else 0.0
    actual = normlib.rms_norm(x3, (6, 8), weight.reshape(6, 8), EPS, offset=offset, casting=casting, backend=backend)
    expected = REFERENCES[casting](x, weight, EPS, offset).reshape(x3.shape)
    allowed = 1 if backend == "torch" else allowed_ulps(backend, torch.bfloat16)
    assert int(ulp_distance(actual, expected).max()) <= allowed
    unscaled = normlib.rms_norm(x, WIDTH, None, EPS, casting=casting, backend=backend)
    ones = torch.ones(WIDTH, dtype=x.dtype)
    assert int(ulp_distance(unscaled, REFERENCES[casting](x, ones, EPS, 0.0)).max()) <= allowed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", ["torch", "llama", "gemma"])
def test_gradients_match_the_reference(casting, backend):
    """Gradients of input and weight through the offset, against autograd of the transcription."""
    x, weight = sample(torch.float32, casting)
    offset = 1.0 if casting == "gemma" else 0.5
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    results = []
    for run in ("normlib", "reference"):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        if run == "normlib":
            y = normlib.rms_norm(*leaves[:1], WIDTH, leaves[1], EPS, offset=offset, casting=casting, backend=backend)
        else:
            y = REFERENCES[casting](leaves[0], leaves[1], EPS, offset)
        y.backward(upstream)
        results.append((y.detach(), leaves[0].grad, leaves[1].grad))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_gradcheck_float64(casting):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    for backend in BACKENDS:
        if backend == "triton":
            continue  # float32 kernels; their gradients are compared in float32 above
        torch.autograd.gradcheck(
            lambda x, w: normlib.rms_norm(x, 5, w, 1e-5, offset=1.0, casting=casting, backend=backend),
            (x, weight),
        )


def test_module_initializes_the_scale_to_one():
    gemma_like = normlib.RMSNorm(WIDTH, eps=EPS, offset=1.0, casting="gemma")
    assert torch.equal(gemma_like.weight.detach(), torch.zeros(WIDTH))
    shifted = normlib.RMSNorm(WIDTH, eps=EPS, offset=0.25)
    assert torch.equal(shifted.weight.detach(), torch.full((WIDTH,), 0.75))
    x = torch.randn(4, WIDTH)
    plain = F.rms_norm(x, (WIDTH,), None, EPS)
    for module in (gemma_like, shifted):
        torch.testing.assert_close(module(x), plain, rtol=1e-6, atol=1e-6)
    assert "offset=1.0, casting='gemma'" in repr(gemma_like)
    assert repr(normlib.RMSNorm(4)) == repr(torch.nn.RMSNorm(4))  # the defaults add nothing


def test_module_matches_transformers_classes():
    """The real classes, where transformers is installed: the module's stated equivalents."""
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    modeling_gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    for dtype in LOW_PRECISION:
        for theirs, ours, casting in (
            (modeling_llama.LlamaRMSNorm(WIDTH, eps=EPS), normlib.RMSNorm(WIDTH, eps=EPS, casting="llama"), "llama"),
            (
                modeling_gemma.GemmaRMSNorm(WIDTH, eps=EPS),
                normlib.RMSNorm(WIDTH, eps=EPS, offset=1.0, casting="gemma"),
                "gemma",
            ),
        ):
            x, weight = sample(dtype, casting)
            for module in (theirs, ours):
                module.to(dtype).weight.data.copy_(weight)
            ours.backend = "torch"
            assert torch.equal(ours(x), theirs(x)), (casting, dtype)
            ours.backend = "auto"
            assert int(ulp_distance(ours(x), theirs(x)).max()) <= 1, (casting, dtype)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(casting="Llama"), ValueError, "casting must be one of"),
        (dict(casting=None), ValueError, "casting must be one of"),
        (dict(offset="1"), TypeError, "offset must be a real number"),
        (dict(offset=True), TypeError, "offset must be a real number"),
        (dict(offset=math.nan), ValueError, "offset must be finite"),
        (dict(offset=math.inf, casting="gemma"), ValueError, "offset must be finite"),
    ],
)
def test_bad_conventions_raise(kwargs, error, words):
    x, weight = sample(torch.float32, "torch")
    with pytest.raises(error, match=words):
        normlib.rms_norm(x, WIDTH, weight, **kwargs)
    with pytest.raises(error, match=words):
        normlib.RMSNorm(WIDTH, **kwargs)


@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_complex_input_is_refused_by_the_float32_conventions(casting):
    x = torch.randn(2, 8, dtype=torch.complex64)
    with pytest.raises(TypeError, match=f"casting='{casting}' computes a real input"):
        normlib.rms_norm(x, 8, torch.ones(8, dtype=torch.complex64), casting=casting)


def test_offset_needs_a_weight():
    x = torch.randn(2, WIDTH)
    with pytest.raises(ValueError, match="offset=1.0 shifts the weight"):
        normlib.rms_norm(x, WIDTH, None, offset=1.0, casting="gemma")
    with pytest.raises(ValueError, match="elementwise_affine=True"):
        normlib.RMSNorm(WIDTH, elementwise_affine=False, offset=1.0)
