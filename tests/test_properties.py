"""Invariances that define each norm, checked on inputs hypothesis chooses.

LayerNorm forgets a per-row shift and positive scale; RMSNorm forgets a per-row positive scale
but not a shift (it does not center); BatchNorm in training forgets a per-channel affine map with
positive scale. Computed in float64 with a negligible eps (eps is the one thing that breaks scale
invariance: a row of variance v scaled by a sees eps / a^2 instead of eps; torch's batch_norm
refuses eps = 0 in training), so "invariant" means equal up to float64 rounding, checked at 1e-7.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from norm_cases import randn

import normlib

EPS = 1e-30
SETTINGS = settings(max_examples=25, deadline=None)

rows = st.integers(1, 4)
widths = st.integers(4, 33)
seeds = st.integers(0, 2**16)
shifts = st.floats(-100.0, 100.0, allow_nan=False)
scales = st.floats(0.1, 10.0, allow_nan=False)


def per_row(values, count: int, strategy_value_count: int) -> torch.Tensor:
    """Cycle hypothesis' list of values to one per row, as a (count, 1) float64 column."""
    return torch.tensor([values[i % strategy_value_count] for i in range(count)], dtype=torch.float64)[:, None]


@SETTINGS
@given(rows, widths, seeds, st.lists(shifts, min_size=1, max_size=4), st.lists(scales, min_size=1, max_size=4))
def test_layer_norm_ignores_per_row_shift_and_positive_scale(num_rows, width, seed, shift_values, scale_values):
    x = randn((num_rows, width), torch.float64, seed=seed)
    shift = per_row(shift_values, num_rows, len(shift_values))  # (rows, 1)
    scale = per_row(scale_values, num_rows, len(scale_values))  # (rows, 1)
    torch.testing.assert_close(
        normlib.layer_norm(scale * x + shift, (width,), eps=EPS), normlib.layer_norm(x, (width,), eps=EPS), rtol=1e-7, atol=1e-7
    )


@SETTINGS
@given(rows, widths, seeds, st.lists(scales, min_size=1, max_size=4))
def test_rms_norm_ignores_per_row_positive_scale(num_rows, width, seed, scale_values):
    x = randn((num_rows, width), torch.float64, seed=seed)
    scale = per_row(scale_values, num_rows, len(scale_values))  # (rows, 1)
    torch.testing.assert_close(normlib.rms_norm(scale * x, (width,), eps=EPS), normlib.rms_norm(x, (width,), eps=EPS), rtol=1e-7, atol=1e-7)


@SETTINGS
@given(rows, widths, seeds, st.floats(0.5, 100.0), st.sampled_from([-1.0, 1.0]))
def test_rms_norm_is_changed_by_a_shift(num_rows, width, seed, magnitude, sign):
    """Unlike LayerNorm: a shifted row is a different direction, so its output differs."""
    x = randn((num_rows, width), torch.float64, seed=seed)
    difference = normlib.rms_norm(x + sign * magnitude, (width,), eps=EPS) - normlib.rms_norm(x, (width,), eps=EPS)
    # every row moves, by far more than float64 noise (~1e-15)
    assert (difference.abs().amax(dim=1) > 1e-4).all(), difference.abs().amax(dim=1)
    # ... while LayerNorm, on the same inputs, does not move
    torch.testing.assert_close(normlib.layer_norm(x + sign * magnitude, (width,), eps=EPS), normlib.layer_norm(x, (width,), eps=EPS))


@SETTINGS
@given(
    st.integers(2, 5),  # N
    st.integers(1, 4),  # C
    st.integers(1, 6),  # L
    seeds,
    st.lists(shifts, min_size=1, max_size=4),
    st.lists(scales, min_size=1, max_size=4),
)
def test_batch_norm_in_training_ignores_per_channel_affine_map(n, c, length, seed, shift_values, scale_values):
    x = randn((n, c, length), torch.float64, seed=seed)
    shift = per_row(shift_values, c, len(shift_values))[None]  # (1, C, 1)
    scale = per_row(scale_values, c, len(scale_values))[None]  # (1, C, 1)
    transformed = normlib.batch_norm(scale * x + shift, None, None, training=True, eps=EPS)
    torch.testing.assert_close(transformed, normlib.batch_norm(x, None, None, training=True, eps=EPS), rtol=1e-7, atol=1e-7)
