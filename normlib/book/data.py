"""Data that ships with a package or is generated: nothing is downloaded at run time.

The book's image experiments use scikit-learn's *digits*: 1797 grey-scale images of 8x8 pixels,
ten classes, stored inside the scikit-learn wheel. Small enough that a CNN trains in seconds on
two CPU cores, real enough that normalization choices change the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """A train/test split as float32 tensors; ``x`` is (N, 1, 8, 8) or (N, 64), ``y`` is (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(flat: bool = False, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's digits, pixels scaled from [0, 16] to [0, 1], split by a seeded shuffle.

    ``flat=True`` gives (N, 64) rows for MLPs; otherwise (N, 1, 8, 8) images for CNNs.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: only the book needs it

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)  # (N, 64)
    y = torch.tensor(bunch.target, dtype=torch.long)  # (N,)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    if not flat:
        x = x.reshape(-1, 1, 8, 8)  # (N, C=1, H=8, W=8)
    n_test = int(round(len(y) * test_fraction))
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])
