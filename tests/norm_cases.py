"""What the normlib norm tests share: per-dtype tolerances, input layouts, a forward+backward runner.

Not a test file itself (no ``test_`` prefix); the test_*.py files about normlib's norms import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# Tolerances (rtol, atol) for comparing a result in `dtype` with the same computation done by
# PyTorch in `dtype`, or by the float64 NumPy reference on the same (already rounded) input.
# Both sides accumulate in at least fp32 and then round to `dtype`, so the differences are a few
# units in the last place of `dtype` plus summation-order noise in reductions over ~4e3 values:
#   float64: 53-bit significand; 1e-9 leaves room for reductions over thousands of elements.
#   float32: 24 bits (ulp 1.2e-7 at 1); parameter gradients sum ~1e4 products, hence 1e-4.
#   float16: 11 bits (ulp 9.8e-4 at 1); one rounding of the output plus fp32 noise -> 1e-2.
#   bfloat16: 8 bits (ulp 7.8e-3 at 1); outputs of magnitude ~4 are off by an ulp of 3e-2 -> 5e-2.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
DTYPES = tuple(TOLERANCES)

# How a test lays out an input in memory: the values never change, only the strides.
LAYOUTS = ("contiguous", "transposed", "sliced")


def randn(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """A reproducible normal sample, drawn in float32 and then cast (so every dtype sees the same values)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=generator) * scale + shift).to(dtype)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in a fresh leaf tensor whose memory layout is ``layout``."""
    if layout == "contiguous":
        out = t.clone()
    elif layout == "transposed":  # the last two dims swapped in memory: strides (..., 1, rows)
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":  # every other element of a twice-as-wide buffer: last stride 2
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        out = wide[..., ::2]
    elif layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS + ('channels_last',)}, got {layout!r}")
    return out.detach()


def forward_backward(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    tensors: Sequence[torch.Tensor | None],
    layout: str = "contiguous",
    seed: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Run ``fn(*leaves)`` and backpropagate a fixed random upstream gradient into every output.

    The first tensor (the input) gets ``layout``; the others stay contiguous. Returns the outputs
    and the gradients of the tensor arguments (None where an argument is None).
    """
    leaves = []
    for position, t in enumerate(tensors):
        if t is None:
            leaves.append(None)
            continue
        leaf = with_layout(t, layout) if position == 0 else t.clone()
        leaves.append(leaf.requires_grad_())
    outputs = fn(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    upstream = [randn(o.shape, o.dtype, seed=seed + i) for i, o in enumerate(outputs)]
    torch.autograd.backward(outputs, upstream)
    return [o.detach() for o in outputs], [None if leaf is None else leaf.grad for leaf in leaves]


def assert_close_all(
    actual: Sequence[torch.Tensor | None], expected: Sequence[torch.Tensor | None], dtype: torch.dtype, what: str
) -> None:
    """Element-wise comparison at ``dtype``'s tolerance, same dtype and shape, None matching None."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} results vs {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{index}]: expected None, got a tensor"
            continue
        assert a is not None, f"{what}[{index}]: expected a tensor, got None"
        assert a.dtype == e.dtype, f"{what}[{index}]: dtype {a.dtype} vs {e.dtype}"
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m: f"{what}[{index}]: {m}")


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


def assert_close_to_reference(actual: torch.Tensor, reference: np.ndarray, dtype: torch.dtype, what: str) -> None:
    """A torch result in ``dtype`` against a float64 NumPy reference, at ``dtype``'s tolerance."""
    torch.testing.assert_close(
        actual.double(), torch.from_numpy(np.asarray(reference, dtype=np.float64)), **TOLERANCES[dtype],
        msg=lambda m: f"{what}: {m}",
    )
