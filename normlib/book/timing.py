"""Timing for the chapters that compare the cost of norms: medians of repeated runs, compared as
ratios within one run (absolute times depend on the machine and on what else it is doing)."""

from __future__ import annotations

from typing import Callable

import torch

from normlib.bench import timing


def median_time(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` untimed ones.

    The median, not the mean: a run interrupted by another process is an outlier, not a signal.
    CUDA work is synchronized before the clock is read. This is the benchmark's own timer
    (:func:`normlib.bench.timing.median_time`), so a chapter and ``python -m normlib.bench`` time
    the same way.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return timing.median_time(fn, repeat=repeat, warmup=warmup, sync=sync)
