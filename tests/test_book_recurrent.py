"""Tests for the recurrent experiment's helpers: per-step BatchNorm statistics, the LSTM that uses
them, the generated task and the training and evaluation functions."""

import pytest
import torch
import torch.nn.functional as F

from normlib.book.recurrent import (
    NormLSTMClassifier,
    StepBatchNorm,
    StepLayerNorm,
    accuracy_at_length,
    sign_of_sum_task,
    train_on_lengths,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_step_batch_norm_keeps_separate_statistics_per_step():
    norm = StepBatchNorm(3, max_steps=2, momentum=1.0)  # momentum 1: the running row is the last batch
    g = _generator()
    step0 = torch.randn(64, 3, generator=g) + 5.0  # (B, C)
    step1 = torch.randn(64, 3, generator=g) - 3.0
    norm.train()
    norm(step0, 0)
    norm(step1, 1)
    torch.testing.assert_close(norm.running_mean[0], step0.mean(0))
    torch.testing.assert_close(norm.running_mean[1], step1.mean(0))
    torch.testing.assert_close(norm.running_var[1], step1.var(0))  # PyTorch stores the unbiased variance


def test_step_batch_norm_matches_batch_norm_per_step_in_training():
    norm = StepBatchNorm(4, max_steps=3)
    x = torch.randn(8, 4, generator=_generator(1))
    expected = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(norm.train()(x, 2), expected)


def test_step_batch_norm_reuses_the_last_step_beyond_max_steps():
    norm = StepBatchNorm(2, max_steps=3)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -2.0]]))
        norm.running_var.copy_(torch.tensor([[1.0, 1.0], [4.0, 4.0], [9.0, 0.25]]))
    norm.eval()
    x = torch.randn(5, 2, generator=_generator(2))
    torch.testing.assert_close(norm(x, 10), norm(x, 2))
    assert not torch.allclose(norm(x, 1), norm(x, 2))


def test_step_batch_norm_refuses_to_train_beyond_max_steps():
    norm = StepBatchNorm(2, max_steps=3).train()
    with pytest.raises(ValueError, match="max_steps=3"):
        norm(torch.randn(4, 2), 3)
    with pytest.raises(ValueError, match="max_steps"):
        StepBatchNorm(2, max_steps=0)


def test_step_layer_norm_ignores_the_step():
    norm = StepLayerNorm(6)
    x = torch.randn(4, 6, generator=_generator(3))
    expected = F.layer_norm(x, (6,), torch.full((6,), 0.1), torch.zeros(6))
    torch.testing.assert_close(norm(x, 0), expected)
    torch.testing.assert_close(norm(x, 99), expected)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_lstm_shapes_and_steps_beyond_max_steps_in_eval(norm):
    model = NormLSTMClassifier(4, 8, 2, norm=norm, max_steps=5)
    x = torch.randn(3, 5, 4, generator=_generator(4))  # (B, T, C)
    assert model.train()(x).shape == (3, 2)
    assert model.eval()(torch.randn(3, 12, 4)).shape == (3, 2)  # 12 > max_steps: eval only


def test_layer_norm_lstm_output_does_not_depend_on_the_batch_but_batch_norm_does():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 4, generator=_generator(5))
    for norm, independent in (("layer", True), ("batch", False)):
        model = NormLSTMClassifier(4, 8, 2, norm=norm, max_steps=7).train()
        with torch.no_grad():
            alone = model(x[:3])
            together = model(x)[:3]
        assert torch.allclose(alone, together, atol=1e-6) == independent, norm


def test_lstm_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        NormLSTMClassifier(4, 8, 2, norm="group", max_steps=5)


def test_sign_of_sum_task_labels_and_determinism():
    task = sign_of_sum_task(50, 9, generator=_generator(6))
    assert task.x.shape == (50, 9, 4) and task.y.shape == (50,)
    torch.testing.assert_close(task.y, (task.x[:, :, 0].sum(1) > 0).long())
    again = sign_of_sum_task(50, 9, generator=_generator(6))
    assert torch.equal(task.x, again.x)
    with pytest.raises(ValueError, match="length"):
        sign_of_sum_task(4, 0, generator=_generator())


def test_training_is_reproducible_and_evaluation_restores_the_mode():
    first = train_on_lengths("batch", seed=3, min_length=2, max_length=4, steps=3, hidden_size=8)
    second = train_on_lengths("batch", seed=3, min_length=2, max_length=4, steps=3, hidden_size=8)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert first.training
    accuracy = accuracy_at_length(first, 9, samples=64)
    assert first.training and 0.0 <= accuracy <= 1.0
    assert accuracy == accuracy_at_length(second, 9, samples=64)
    with pytest.raises(ValueError, match="min_length"):
        train_on_lengths("layer", seed=0, min_length=5, max_length=4)
