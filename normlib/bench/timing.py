"""How the benchmark times: implementations in alternation, medians, and the copy it compares with.

Speed is only ever reported as a ratio within one run: to another implementation on the same
tensor, or to a copy of the same number of bytes (the attainable memory bandwidth at that working
set, cache included).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Hashable, Optional, TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)

# Adaptive repeats (repeats=None): enough runs for a measurement of about this long, so that a
# microsecond-sized case gets hundreds of samples while a 16384 x 8192 one is not run for minutes.
TARGET_MEASUREMENT_SECONDS = 0.2
MIN_REPEATS, MAX_REPEATS = 5, 1000
WARMUP_CALLS = 3  # at most; two when the calls are slow (see time_interleaved)
ROUNDS = 3  # rounds of alternation between the implementations timed on one tensor


def adaptive_repeats(
    seconds_per_call: float,
    target_seconds: float = TARGET_MEASUREMENT_SECONDS,
    minimum: int = MIN_REPEATS,
    maximum: int = MAX_REPEATS,
) -> int:
    """How many timed runs make a measurement of about ``target_seconds``, given one call's time,
    within [minimum, maximum]: never fewer than a median needs, never thousands of tiny runs."""
    if not seconds_per_call > 0:  # below the clock's resolution: as fast as it gets
        return maximum
    return max(minimum, min(maximum, math.ceil(target_seconds / seconds_per_call)))


def time_interleaved(
    steps: dict[Key, Callable[[], object]],
    repeats: Optional[int],
    *,
    rounds: int = ROUNDS,
    sync: Callable[[], None] = lambda: None,
    target_seconds: float = TARGET_MEASUREMENT_SECONDS,
    min_sample_seconds: float = 0.0,
) -> dict[Key, float]:
    """key -> median seconds of each step, the steps timed in alternation.

    Why alternate: on a shared machine the load of other processes comes and goes over seconds.
    Timed one after another, one implementation can catch a busy stretch that the next one misses,
    and their ratio -- what this benchmark reports -- is off. Here every step is warmed up, then
    ``rounds`` rounds each run every step for its share of the repeats, so all steps sample the
    same stretches; the median of all a step's samples drops the runs that were interrupted.

    ``repeats=None`` chooses each step's number of runs with :func:`adaptive_repeats` from its
    fastest warm-up call, for measurements of about ``target_seconds``. Warm-up (WARMUP_CALLS calls)
    stops after two once the second took ``target_seconds``: a call that slow needs no warm cache,
    and the biggest cases would otherwise spend minutes warming up.
    ``sync`` waits for the device (CUDA runs asynchronously) before the clock is read. With
    ``min_sample_seconds``, a sample runs a step as many times as last that long and is divided by
    that count: a GPU kernel of microseconds, synchronized alone, would be timed together with its
    launch and the synchronization.
    """

    def run(step: Callable[[], object], calls: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        return (time.perf_counter() - start) / calls

    sync()
    counts, calls = {}, {}
    for label, step in steps.items():
        warmup: list[float] = []
        # At least two calls: a first call can carry one-time costs (the process's first backward,
        # a compile) that would pass for the step's own time.
        while len(warmup) < 2 or (len(warmup) < WARMUP_CALLS and sum(warmup[1:]) < target_seconds):
            warmup.append(run(step))
        calls[label] = max(1, math.ceil(min_sample_seconds / min(warmup))) if min(warmup) > 0 else 1
        sample_seconds = min(warmup) * calls[label]
        counts[label] = repeats if repeats is not None else adaptive_repeats(sample_seconds, target_seconds)
    samples: dict[Key, list[float]] = {label: [] for label in steps}
    for round_index in range(rounds):
        for label, step in steps.items():
            share = counts[label] // rounds + (round_index < counts[label] % rounds)
            samples[label].extend(run(step, calls[label]) for _ in range(share))
    return {label: statistics.median(times) for label, times in samples.items()}


def median_time(fn: Callable[[], object], *, repeat: int = 20, warmup: int = 3,
                sync: Callable[[], None] = lambda: None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def sync_for(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before the clock is read."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def copy_step(n_bytes: int, device: torch.device) -> Callable[[], object]:
    """A step copying ``n_bytes`` (half read, half written, at least one float each way): the
    reference an op moving ``n_bytes`` is compared with, at the same working-set size, so that a
    tensor served from a cache is compared with a copy served from the same cache."""
    elements = max(1, n_bytes // 2 // 4)
    src = torch.ones(elements, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bytes(n_bytes: int) -> int:
    """The bytes :func:`copy_step` really moves for a request of ``n_bytes`` (whole floats)."""
    return 2 * 4 * max(1, n_bytes // 2 // 4)


def measure_copy_bandwidth(device: torch.device, megabytes: int = 64, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` on a tensor of ``megabytes``: read + write."""
    n_bytes = 2 * megabytes * 2**20
    seconds = median_time(copy_step(n_bytes, device), repeat=repeats, warmup=2, sync=sync_for(device))
    return copy_bytes(n_bytes) / seconds / 1e9


def last_level_cache_bytes(device: torch.device) -> Optional[int]:
    """The size of ``device``'s largest cache (a GPU's L2; a CPU's last level, from Linux's sysfs),
    or None where it is not known. A case whose bytes fit in it may be served from the cache."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or None
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None
