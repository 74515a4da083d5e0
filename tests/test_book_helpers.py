"""Tests for the book helpers: the statistics axes, padded sequence batches, page figures, the timer."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlib.book.axes import KINDS, plot_norm_axes, shared_statistics_mask
from normlib.book.plots import FIGURE_DPI, PAGE_WIDTH, page_figure
from normlib.book.sequences import pad_sequences, random_padded_batch, random_sequence

N, C, HW, G = 3, 4, 5, 2


def _torch_norm(kind: str, x: torch.Tensor) -> torch.Tensor:
    """What each kind computes, written with torch ops, on x of shape (N, C, HW)."""
    if kind == "batch":
        return F.batch_norm(x, None, None, training=True)
    if kind == "layer":
        return F.group_norm(x, 1)
    if kind == "layer2d":
        return F.layer_norm(x.transpose(1, 2), (x.shape[1],)).transpose(1, 2)
    if kind == "instance":
        return F.instance_norm(x)
    return F.group_norm(x, G)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_is_the_set_of_outputs_that_share_statistics_with_element_0(kind):
    # Moving one input element moves the statistics of its set, hence every output in that set and
    # no output outside it: the changed outputs are exactly the set the figure colours.
    x = torch.randn(N, C, HW, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    moved = x.clone()
    moved[0, 0, 0] += 3.0
    changed = (_torch_norm(kind, moved) - _torch_norm(kind, x)).abs() > 1e-9
    np.testing.assert_array_equal(changed.numpy(), shared_statistics_mask(kind, N, C, HW, groups=G))


def test_mask_sizes():
    assert shared_statistics_mask("batch", N, C, HW).sum() == N * HW
    assert shared_statistics_mask("layer", N, C, HW).sum() == C * HW
    assert shared_statistics_mask("layer2d", N, C, HW).sum() == C
    assert shared_statistics_mask("instance", N, C, HW).sum() == HW
    assert shared_statistics_mask("group", N, C, HW, groups=G).sum() == C // G * HW


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(kind="batchnorm", n=2, c=2, hw=2), "kind"),
        (dict(kind="batch", n=0, c=2, hw=2), "n"),
        (dict(kind="group", n=2, c=3, hw=2, groups=2), "groups"),
    ],
)
def test_mask_rejects_bad_arguments_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        shared_statistics_mask(**kwargs)


def test_plot_draws_one_titled_3d_box_per_kind():
    fig = plot_norm_axes(("batch", "layer2d", "group"), groups=3, c=6)
    assert len(fig.axes) == 3
    assert [ax.name for ax in fig.axes] == ["3d"] * 3
    assert fig.axes[0].get_title().startswith("BatchNorm")
    assert "G=3" in fig.axes[2].get_title()
    with pytest.raises(ValueError, match="kinds"):
        plot_norm_axes(())


def test_page_figure_fits_the_text_column_and_stacks_panels_in_rows():
    import matplotlib.pyplot as plt

    # the site's text column is 784 px on a desktop; a figure drawn wider is shrunk on screen
    assert PAGE_WIDTH * FIGURE_DPI <= 784
    fig, axes = page_figure(3, per_row=2, panel_height=2.5)
    assert len(axes) == 3 and len(fig.axes) == 3
    assert tuple(fig.get_size_inches()) == (PAGE_WIDTH, 5.0)
    assert fig.dpi == FIGURE_DPI
    # reading order: two panels in the first row, the third below the first
    (x0, y0), (x1, y1), (x2, y2) = [ax.get_position().p0 for ax in axes]
    assert x0 < x1 and y0 == y1 and x2 == x0 and y2 < y0
    plt.close(fig)
    fig, ax = page_figure()
    assert ax is fig.axes[0]
    plt.close(fig)
    with pytest.raises(ValueError, match="panels"):
        page_figure(0)


def test_random_sequence_depends_on_its_seed_only():
    a = random_sequence(7, 3, seed=5)
    assert a.shape == (7, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a, random_sequence(7, 3, seed=5), rtol=0, atol=0)
    assert not torch.equal(a, random_sequence(7, 3, seed=6))
    assert abs(random_sequence(4000, 1, seed=0).mean().item() - 1.0) < 0.1  # the default mean


def test_pad_sequences_places_tokens_and_padding():
    batch = random_padded_batch([2, 5], 3, seed=1, max_length=6, pad_value=-7.0)
    assert batch.x.shape == (2, 6, 3)
    assert batch.lengths.tolist() == [2, 5]
    assert batch.mask.tolist() == [[True] * 2 + [False] * 4, [True] * 5 + [False]]
    assert (batch.x[~batch.mask] == -7.0).all()
    torch.testing.assert_close(batch.x[0, :2], random_sequence(2, 3, seed=1), rtol=0, atol=0)
    torch.testing.assert_close(batch.x[1, :5], random_sequence(5, 3, seed=2), rtol=0, atol=0)
    assert batch.padding_fraction == pytest.approx(5 / 12)


def test_pad_sequences_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match="max_length"):
        random_padded_batch([4, 5], 2, max_length=3)
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        pad_sequences([torch.zeros(3, 2), torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="sequences"):
        pad_sequences([])
    with pytest.raises(ValueError, match="length"):
        random_sequence(0, 2, seed=0)


def test_median_time_times_only_the_repeats_and_takes_their_median(monkeypatch):
    from normlib.bench import timing as bench_timing
    from normlib.book.timing import median_time

    clock = [0.0]
    monkeypatch.setattr(bench_timing.time, "perf_counter", lambda: clock[0])
    durations = iter([100.0, 100.0, 3.0, 1.0, 2.0, 50.0, 4.0])  # two warm-ups, then five runs

    def fn():
        clock[0] += next(durations)

    assert median_time(fn, repeat=5, warmup=2) == 3.0
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        median_time(fn, repeat=0)
