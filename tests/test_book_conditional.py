"""The class-conditional denoiser of the chapter on conditional norms."""

from __future__ import annotations

import pytest
import torch

import normlib
from normlib.book.conditional import (
    CONDITIONINGS,
    ConditionalDenoiser,
    denoising_error,
    noisy,
    train_denoiser,
)


def small_digits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_shapes_and_conditioning_layers(conditioning):
    torch.manual_seed(0)
    model = ConditionalDenoiser(conditioning, width=8, num_blocks=2)
    x, labels = small_digits(6)
    assert model(x, labels).shape == x.shape
    kinds = {type(m) for m in model.modules()}
    expected = {
        "none": None,
        "film": normlib.FiLM,
        "cbn": normlib.ConditionalBatchNorm2d,
        "adaln_zero": normlib.AdaLNZeroBlock,
    }[conditioning]
    if expected is not None:
        assert expected in kinds


def test_adaln_zero_model_starts_as_stem_then_head():
    torch.manual_seed(0)
    model = ConditionalDenoiser("adaln_zero", width=8, num_blocks=3).eval()
    x, labels = small_digits(5)
    with torch.no_grad():
        assert torch.equal(model(x, labels), model.head(model.stem(x)))


@pytest.mark.parametrize("conditioning", ["film", "cbn", "adaln_zero"])
def test_conditioned_models_depend_on_the_label_once_trained(conditioning):
    torch.manual_seed(0)
    model = ConditionalDenoiser(conditioning, width=8, num_blocks=2)
    x, labels = small_digits(64)
    train_denoiser(model, x, labels, noise_std=0.5, epochs=2, batch_size=16, lr=1e-2, seed=0)
    right = denoising_error(model, x, labels, noise_std=0.5)
    wrong = denoising_error(model, x, (labels + 1) % 10, noise_std=0.5)
    assert right != wrong


def test_unconditioned_model_ignores_the_label():
    torch.manual_seed(0)
    model = ConditionalDenoiser("none", width=8, num_blocks=2)
    x, labels = small_digits(32)
    train_denoiser(model, x, labels, noise_std=0.5, epochs=1, batch_size=16, lr=1e-2, seed=0)
    assert denoising_error(model, x, labels, noise_std=0.5) == denoising_error(
        model, x, (labels + 3) % 10, noise_std=0.5
    )


def test_training_lowers_the_loss_and_is_reproducible():
    x, labels = small_digits(64)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ConditionalDenoiser("cbn", width=8, num_blocks=1)
        runs.append(train_denoiser(model, x, labels, noise_std=0.3, epochs=6, batch_size=16, lr=1e-2, seed=3))
    assert runs[0] == runs[1]
    assert sum(runs[0][-4:]) < sum(runs[0][:4])


def test_noisy_and_error_use_the_seed():
    x = torch.zeros(4, 1, 8, 8)
    a = noisy(x, 0.5, torch.Generator().manual_seed(1))
    b = noisy(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and abs(a.std().item() - 0.5) < 0.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ConditionalDenoiser("ada")
    x, labels = small_digits(8)
    with pytest.raises(ValueError, match="batch_size"):
        train_denoiser(ConditionalDenoiser("none", width=4, num_blocks=1), x, labels, noise_std=0.1, epochs=1,
                       batch_size=9, lr=1e-3, seed=0)
