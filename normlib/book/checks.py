"""Experimental conclusions stated as checks with a margin, so that a chapter's verdicts hold on any
machine.

Training a network amplifies the last bits of floating-point sums, and those bits depend on the
processor (AVX-512, AVX2, ARM), the math library and the number of threads. The printed accuracy of
one trained model is therefore not a property of the code, and a notebook that compares it digit for
digit passes only on the machine that wrote it. What *is* a property of the code is a conclusion that
holds with room to spare over several seeds: "BatchNorm beats no normalization by more than 0.2 in
accuracy, every seed". Each function here asserts one such conclusion and prints one verdict line
that does not depend on the measured digits:

    [01-lr-range] BatchNorm trains at lr 0.3, no normalization stays at chance: holds (margin 0.20)

nbval compares that line exactly. The raw numbers stay in the notebook for the reader (in a cell
tagged ``nbval-ignore-output``), and when a check fails the cell fails with an error that names every
measured value, so the reader of a red test run sees what moved.

A margin is fixed in advance by the chapter's author from the spread over seeds that the chapter
shows, never computed from the run being checked: the verdict line must print the same text wherever
the check holds. Comparisons of two groups of runs also require the gap between their means to exceed
the sum of their standard deviations over seeds (:func:`check_greater`), so that an effect as small
as the seed-to-seed noise is never reported as found, whatever margin was chosen.

Each check has an id, ``<chapter>-<name>`` (``"01-lr-range"``); the chapter puts the MyST target
``(check-01-lr-range)=`` in the markdown cell before the check, so that prose and the claims page can
link to it, and ``tests/test_book_checks.py`` verifies that every id is defined once and targeted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "CheckFailed",
    "Spread",
    "check",
    "check_all_above",
    "check_all_below",
    "check_close",
    "check_greater",
    "spread",
]

CHECK_ID = re.compile(r"^\d{2}[a-z]?-[a-z0-9]+(?:-[a-z0-9]+)*$")


class CheckFailed(AssertionError):
    """An experiment's conclusion did not hold; the message names what was measured."""


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1) of one quantity measured over several seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        # the sample standard deviation: with 3 to 5 seeds the population formula would understate it
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        return float(np.max(self.values))

    def format(self, digits: int = 2) -> str:
        """``"0.91 ± 0.02 (n=5)"``: what a chapter prints in a table of results."""
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"

    def __str__(self) -> str:
        return self.format()


def spread(values: Iterable[float], *, name: str = "values") -> Spread:
    """Wrap per-seed measurements; refuses an empty list and NaN (a diverged run is not a number:
    count it separately, or record it as chance accuracy, and say which)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name}: expected at least one measurement, got none")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{name}: NaN among the measurements {_list(values)}; a diverged run needs an explicit value")
    return Spread(values)


def _list(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _validate(check_id: str, claim: str, margin: float | None = None) -> None:
    if not isinstance(check_id, str) or not CHECK_ID.match(check_id):
        raise ValueError(
            f"check_id must look like '01-lr-range' (chapter number, a dash, lowercase words joined by "
            f"dashes), got {check_id!r}"
        )
    if not isinstance(claim, str) or not claim.strip() or "\n" in claim:
        raise ValueError(f"claim must be a non-empty one-line sentence, got {claim!r}")
    if margin is not None and not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")


def _verdict(check_id: str, claim: str, detail: str) -> None:
    print(f"[{check_id}] {claim}: holds ({detail})")


def check(check_id: str, claim: str, holds: bool, *, measured: str, margin: str) -> None:
    """The general form: ``holds`` is the conclusion, evaluated by the caller.

    ``margin`` describes the room the condition leaves (fixed text, printed in the verdict);
    ``measured`` describes the values it was computed from (shown only when the check fails).
    Prefer the specific checks below, which build both from the numbers.
    """
    _validate(check_id, claim)
    if not isinstance(holds, (bool, np.bool_)):
        raise TypeError(f"holds must be a bool, got {type(holds).__name__}")
    if not holds:
        raise CheckFailed(f"[{check_id}] {claim}: does NOT hold; measured {measured}; required {margin}")
    _verdict(check_id, claim, margin)


def check_greater(
    check_id: str,
    claim: str,
    larger: Iterable[float],
    smaller: Iterable[float],
    *,
    margin: float,
    names: tuple[str, str] = ("larger", "smaller"),
) -> None:
    """Group ``larger``'s mean exceeds group ``smaller``'s by at least ``margin``, and by more than
    the seed-to-seed spread (the sum of the two groups' standard deviations).

    Use it for "A trains better than B": each argument holds one value per seed.
    """
    _validate(check_id, claim, margin)
    a = spread(larger, name=names[0])
    b = spread(smaller, name=names[1])
    gap = a.mean - b.mean
    noise = a.std + b.std
    if not (gap >= margin and gap > noise):
        raise CheckFailed(
            f"[{check_id}] {claim}: does NOT hold; {names[0]} {a.format(4)} {_list(a.values)}, "
            f"{names[1]} {b.format(4)} {_list(b.values)}: gap {gap:.4g}, required >= margin {margin:g} "
            f"and > spread {noise:.4g} (sum of the standard deviations)"
        )
    _verdict(check_id, claim, f"margin {margin:g}")


def check_close(
    check_id: str,
    claim: str,
    first: Iterable[float],
    second: Iterable[float],
    *,
    tolerance: float,
    names: tuple[str, str] = ("first", "second"),
) -> None:
    """The means of two groups differ by at most ``tolerance``: "A and B do equally well".

    Equality is only ever shown up to a tolerance; the verdict line prints it, so a reader knows
    how large a difference the experiment could have missed.
    """
    _validate(check_id, claim, tolerance)
    a = spread(first, name=names[0])
    b = spread(second, name=names[1])
    gap = abs(a.mean - b.mean)
    if not gap <= tolerance:
        raise CheckFailed(
            f"[{check_id}] {claim}: does NOT hold; {names[0]} {a.format(4)} {_list(a.values)}, "
            f"{names[1]} {b.format(4)} {_list(b.values)}: |gap| {gap:.4g} > tolerance {tolerance:g}"
        )
    _verdict(check_id, claim, f"within {tolerance:g}")


def _check_every_run(check_id: str, claim: str, values: Iterable[float], bound: float, name: str, above: bool) -> None:
    _validate(check_id, claim)
    s = spread(values, name=name)
    extreme, word = (s.min, "smallest") if above else (s.max, "largest")
    side = "above" if above else "below"
    if not (extreme > bound if above else extreme < bound):
        raise CheckFailed(
            f"[{check_id}] {claim}: does NOT hold; {name} {_list(s.values)}, {word} {extreme:.4g} "
            f"is not {side} {bound:g}"
        )
    _verdict(check_id, claim, f"every run {side} {bound:g}")


def check_all_above(check_id: str, claim: str, values: Iterable[float], bound: float, *, name: str = "values") -> None:
    """Every measurement (every seed, every setting) is above ``bound``: "each run learns"."""
    _check_every_run(check_id, claim, values, bound, name, above=True)


def check_all_below(check_id: str, claim: str, values: Iterable[float], bound: float, *, name: str = "values") -> None:
    """Every measurement is below ``bound``: "each run stays at chance"."""
    _check_every_run(check_id, claim, values, bound, name, above=False)
