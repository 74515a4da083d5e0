"""QK-norm (normlib/qk_norm.py): the NumPy reference against a hand computation, the op and the module
against the reference and against PyTorch's own norms for every backend and dtype, gradcheck, the
logit bound, invariances and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from norm_cases import DTYPES, TOLERANCES, randn

import normlib
from normlib.qk_norm import QK_NORMS, QKNorm, qk_norm, qk_norm_reference

# (q shape, k shape): (B, nh, T, hs) with awkward sizes, keys of another length, and hs = 1
SHAPES = [
    ((2, 3, 5, 8), (2, 3, 5, 8)),
    ((3, 5, 7, 13), (3, 5, 4, 13)),
    ((4, 1), (6, 1)),
    ((2, 4, 3, 64), (2, 4, 3, 64)),
]
BOTH = set(normlib.available_backends("layer_norm")) & set(normlib.available_backends("rms_norm"))
BACKENDS = sorted(BOTH) + ["auto"]


def weights(hs: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "q_weight": randn((hs,), dtype, seed=20, scale=0.5, shift=1.0),
        "k_weight": randn((hs,), dtype, seed=21, scale=0.5, shift=1.0),
        "q_bias": randn((hs,), dtype, seed=22, scale=0.5),
        "k_bias": randn((hs,), dtype, seed=23, scale=0.5),
    }


def test_reference_matches_a_hand_computation():
    q = np.array([[1.0, 2.0, 3.0, 6.0]])  # mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5, mean square 12.5
    k = np.array([[2.0, -2.0, 2.0, -2.0]])  # mean 0, var 4, mean square 4
    q_hat, k_hat = qk_norm_reference(q, k, "layer", eps=0.0)
    np.testing.assert_allclose(q_hat, (q - 3.0) / math.sqrt(3.5), rtol=1e-12)
    np.testing.assert_allclose(k_hat, k / 2.0, rtol=1e-12)
    q_hat, k_hat = qk_norm_reference(q, k, "rms", eps=0.0)
    np.testing.assert_allclose(q_hat, q / math.sqrt(12.5), rtol=1e-12)
    np.testing.assert_allclose(k_hat, k / 2.0, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", QK_NORMS)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_op_matches_reference_and_torch(shapes, kind, dtype, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32 only")
    q = randn(shapes[0], dtype, seed=1, scale=3.0, shift=0.7)
    k = randn(shapes[1], dtype, seed=2, scale=0.2, shift=-0.4)
    hs = shapes[0][-1]
    params = weights(hs, dtype)
    if kind == "rms":
        params = {name: t for name, t in params.items() if "weight" in name}
    q_hat, k_hat = qk_norm(q, k, kind, **params, eps=1e-5, backend=backend)
    assert q_hat.dtype == k_hat.dtype == dtype and q_hat.shape == q.shape and k_hat.shape == k.shape
    as_numpy = {name: t.double().numpy() for name, t in params.items()}
    q_ref, k_ref = qk_norm_reference(q.double().numpy(), k.double().numpy(), kind, **as_numpy, eps=1e-5)
    torch.testing.assert_close(q_hat.double(), torch.from_numpy(q_ref), **TOLERANCES[dtype])
    torch.testing.assert_close(k_hat.double(), torch.from_numpy(k_ref), **TOLERANCES[dtype])
    if kind == "layer":
        q_torch = F.layer_norm(q, (hs,), params["q_weight"], params["q_bias"], 1e-5)
    else:
        q_torch = F.rms_norm(q, (hs,), params["q_weight"], 1e-5)
    torch.testing.assert_close(q_hat, q_torch, **TOLERANCES[dtype])


@pytest.mark.parametrize("kind", QK_NORMS)
def test_gradcheck_float64(kind):
    q = randn((2, 2, 3, 5), torch.float64, seed=3).requires_grad_()
    k = randn((2, 2, 4, 5), torch.float64, seed=4).requires_grad_()
    q_weight = randn((5,), torch.float64, seed=5, shift=1.0).requires_grad_()
    k_weight = randn((5,), torch.float64, seed=6, shift=1.0).requires_grad_()

    def logits(q, k, q_weight, k_weight):  # the quantity attention uses: (B, nh, Tq, Tk)
        q_hat, k_hat = qk_norm(q, k, kind, q_weight, k_weight, eps=1e-5)
        return q_hat @ k_hat.transpose(-2, -1)

    assert torch.autograd.gradcheck(logits, (q, k, q_weight, k_weight))


def test_rms_variant_bounds_the_logits_by_sqrt_hs():
    # With unit gains, ||q_hat|| = ||k_hat|| = sqrt(hs) (up to eps), so q_hat . k_hat / sqrt(hs) is
    # sqrt(hs) times a cosine: at most sqrt(hs) however large q and k are.
    hs = 16
    q = randn((2, 4, 6, hs), seed=7, scale=1e4)
    k = torch.cat([q[:, :, :1] * 3.0, randn((2, 4, 5, hs), seed=8, scale=1e-3)], dim=2)  # key 0 parallel to query 0
    q_hat, k_hat = qk_norm(q, k, "rms", eps=0.0)
    logits = q_hat @ k_hat.transpose(-2, -1) / math.sqrt(hs)  # (2, 4, 6, 6)
    assert logits.abs().max() <= math.sqrt(hs) * (1 + 1e-5)
    torch.testing.assert_close(logits[:, :, 0, 0], torch.full((2, 4), math.sqrt(hs)), rtol=1e-5, atol=1e-5)
    raw = q @ k.transpose(-2, -1) / math.sqrt(hs)
    assert raw.abs().max() > 1e6  # without the norm the same logits are huge


@pytest.mark.parametrize("kind", QK_NORMS)
def test_scaling_queries_and_keys_changes_nothing(kind):
    q, k = randn((3, 2, 5, 8), torch.float64, seed=9), randn((3, 2, 5, 8), torch.float64, seed=10)
    expected = qk_norm(q, k, kind, eps=0.0)
    scaled = qk_norm(7.5 * q, 0.01 * k, kind, eps=0.0)
    for a, b in zip(expected, scaled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    shifted = qk_norm(q + 4.0, k - 2.0, kind, eps=0.0)  # only LayerNorm removes a shift
    assert torch.allclose(shifted[0], expected[0], atol=1e-9) == (kind == "layer")


@pytest.mark.parametrize("kind", QK_NORMS)
def test_module_starts_as_standardization_and_matches_the_op(kind):
    module = QKNorm(8, kind)
    expected_keys = {"q_norm.weight", "k_norm.weight"} | ({"q_norm.bias", "k_norm.bias"} if kind == "layer" else set())
    assert set(module.state_dict()) == expected_keys
    q, k = randn((2, 3, 4, 8), seed=11, scale=5.0), randn((2, 3, 4, 8), seed=12)
    q_hat, k_hat = module(q, k)
    reference = qk_norm(q, k, kind)
    torch.testing.assert_close(q_hat, reference[0])
    torch.testing.assert_close(k_hat, reference[1])
    with torch.no_grad():
        module.q_norm.weight.mul_(2.0)
    # gamma_q = 2, beta_q = 0: the queries double, the keys do not move
    torch.testing.assert_close(module(q, k)[0], 2.0 * reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(q, k)[1], reference[1])
    assert f"kind={kind!r}" in repr(module)


def test_module_without_affine_has_no_parameters():
    assert list(QKNorm(4, "layer", elementwise_affine=False).parameters()) == []
    assert list(QKNorm(4, "rms", elementwise_affine=False).parameters()) == []


def test_bad_input_names_the_argument():
    q, k = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind"):
        qk_norm(q, k, "batch")
    with pytest.raises(ValueError, match="kind"):
        qk_norm_reference(q.numpy(), k.numpy(), "group")
    with pytest.raises(ValueError, match="last axis"):
        qk_norm(q, torch.randn(3, 5))
    with pytest.raises(ValueError, match="last axis"):
        qk_norm_reference(q.numpy(), np.ones((3, 5)))
    with pytest.raises(ValueError, match="q_bias and k_bias"):
        qk_norm(q, k, "rms", q_bias=torch.zeros(4))
    with pytest.raises(TypeError, match="input"):
        qk_norm(torch.ones(2, 4, dtype=torch.long), k)
    with pytest.raises(TypeError, match="k must be"):
        qk_norm(q, k.numpy())
    with pytest.raises(ValueError, match="head_size"):
        QKNorm(0)
    with pytest.raises(ValueError, match="kind"):
        QKNorm(4, "none")
    with pytest.raises(ValueError, match="backend"):
        QKNorm(4, backend="cuda-fast")
    with pytest.raises(ValueError, match="last axis"):
        QKNorm(4)(q, torch.randn(3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", QK_NORMS)
def test_heads_laid_out_by_transpose_give_the_contiguous_result(kind, backend):
    # In attention, q and k come from a (B, T, nh, hs) view transposed to (B, nh, T, hs): not contiguous.
    q_bthd, k_bthd = randn((2, 6, 3, 8), seed=13, scale=2.0), randn((2, 6, 3, 8), seed=14)
    q, k = q_bthd.transpose(1, 2), k_bthd.transpose(1, 2)  # (B, nh, T, hs)
    assert not q.is_contiguous()
    ours = qk_norm(q, k, kind, eps=1e-5, backend=backend)
    expected = qk_norm(q.contiguous(), k.contiguous(), kind, eps=1e-5, backend="torch")
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
