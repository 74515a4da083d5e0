"""Timing for the chapters that compare the cost of norms: medians of repeated runs, compared as
ratios within one run (absolute times depend on the machine and on what else it is doing)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` untimed ones.

    The median, not the mean: a run interrupted by another process is an outlier, not a signal.
    CUDA work is synchronized before the clock is read.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]
