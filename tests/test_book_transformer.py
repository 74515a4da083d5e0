"""Tests of the chapters' tiny Transformer (normlib/book/transformer.py) and its generated
sequence tasks (normlib/book/tasks.py)."""

import pytest
import torch
from torch import nn

import normlib
from normlib.book.tasks import (
    IGNORE,
    PAD,
    TASKS,
    SequenceHistory,
    evaluate,
    make_batch,
    train_on_task,
    warmup_factor,
)
from normlib.book.transformer import NORMS, BatchNormOverTokens, Block, TinyTransformer, make_norm


def small_model(**kwargs) -> TinyTransformer:
    torch.manual_seed(0)
    config = dict(block_size=6, n_embd=16, n_head=2, n_layer=2)
    config.update(kwargs)
    return TinyTransformer(**config)


def tokens(batch: int = 5, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("norm", NORMS)
def test_logits_have_one_row_per_token(norm, placement):
    model = small_model(norm=norm, placement=placement)
    logits = model(tokens(batch=5, length=4))  # shorter than block_size is allowed
    assert logits.shape == (5, 4, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "norm, expected_type",
    [("layer", normlib.LayerNorm), ("rms", normlib.RMSNorm), ("batch", BatchNormOverTokens)],
)
def test_norm_choice_sets_the_type_of_every_norm_layer(norm, expected_type):
    model = small_model(norm=norm, placement="pre", n_layer=3)
    found = [m for m in model.modules() if isinstance(m, expected_type)]
    assert len(found) == 2 * 3 + 1  # two per block plus the final norm of Pre-LN
    other_types = {normlib.LayerNorm, normlib.RMSNorm, BatchNormOverTokens} - {expected_type}
    assert not any(isinstance(m, tuple(other_types)) for m in model.modules())


def test_post_ln_has_no_final_norm_and_none_has_no_norm_at_all():
    post = small_model(norm="layer", placement="post", n_layer=3)
    assert sum(isinstance(m, normlib.LayerNorm) for m in post.modules()) == 2 * 3
    assert isinstance(post.norm_f, nn.Identity)
    plain = small_model(norm="none")
    assert not any(isinstance(m, (normlib.LayerNorm, normlib.RMSNorm, BatchNormOverTokens)) for m in plain.modules())


def test_batch_norm_over_tokens_pools_statistics_over_batch_and_time():
    torch.manual_seed(0)
    layer = BatchNormOverTokens(8).train()
    x = torch.randn(4, 5, 8) * 3 + 2  # (B, T, C)
    y = layer(x)
    flat = y.reshape(-1, 8)  # (B*T, C): one mean and variance per channel over all tokens
    torch.testing.assert_close(flat.mean(dim=0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(dim=0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    # not per sequence: a single sequence's tokens are not standardized on their own
    assert y[0].mean(dim=0).abs().max() > 1e-3
    reference = nn.BatchNorm1d(8).train()(x.reshape(20, 8)).reshape(4, 5, 8)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)


def test_post_ln_block_output_is_normalized_and_pre_ln_is_not():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16) * 5 + 1  # (B, T, C), far from zero mean and unit variance
    post = Block(16, 2, norm="layer", placement="post")
    pre = Block(16, 2, norm="layer", placement="pre")
    pre.load_state_dict(post.state_dict())  # same weights: only the placement differs
    y_post, y_pre = post(x), pre(x)
    torch.testing.assert_close(y_post.mean(dim=-1), torch.zeros(3, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(y_post.var(dim=-1, unbiased=False), torch.ones(3, 6), atol=1e-3, rtol=0)
    assert y_pre.var(dim=-1, unbiased=False).mean() > 5
    assert not torch.allclose(y_pre, y_post)


def test_pre_ln_block_with_silent_branches_is_the_identity_but_post_ln_is_not():
    # The residual stream of Pre-LN passes through untouched; Post-LN normalizes it at every block.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16) * 3
    for placement, should_be_identity in [("pre", True), ("post", False)]:
        block = Block(16, 2, norm="layer", placement=placement)
        with torch.no_grad():
            for linear in (block.attn.proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        assert torch.allclose(block(x), x) == should_be_identity


def test_model_rejects_bad_arguments_with_their_names():
    with pytest.raises(ValueError, match="norm"):
        make_norm("group", 16)
    with pytest.raises(ValueError, match="placement"):
        small_model(placement="middle")
    with pytest.raises(ValueError, match="n_head"):
        small_model(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_layer"):
        small_model(n_layer=0)
    with pytest.raises(ValueError, match="block_size"):
        small_model()(tokens(length=7))
    with pytest.raises(ValueError, match="idx"):
        small_model()(torch.zeros(2, 3, 4, dtype=torch.long))


def test_copy_targets_equal_inputs():
    inputs, targets = make_batch("copy", 16, 7, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (16, 7)
    assert torch.equal(inputs, targets)
    assert inputs.min() >= 0 and inputs.max() <= 9


def test_reverse_targets_read_the_input_back_to_front():
    inputs, targets = make_batch("reverse", 16, 7, torch.Generator().manual_seed(1))
    for i in range(7):
        assert torch.equal(targets[:, i], inputs[:, 6 - i])
    assert not torch.equal(inputs, targets)  # random sequences are almost never palindromes


def test_sort_targets_are_ascending_permutations_of_the_input():
    inputs, targets = make_batch("sort", 32, 9, torch.Generator().manual_seed(2))
    assert (targets[:, 1:] >= targets[:, :-1]).all()
    for row_in, row_out in zip(inputs, targets):
        assert torch.equal(torch.bincount(row_in, minlength=10), torch.bincount(row_out, minlength=10))
    assert not torch.equal(inputs, targets)


@pytest.mark.parametrize("task", TASKS)
def test_padded_batches_apply_the_task_to_the_unpadded_part(task):
    inputs, targets = make_batch(task, 64, 8, torch.Generator().manual_seed(5), min_length=3)
    lengths = (inputs != PAD).sum(dim=1)  # (B,)
    assert lengths.min() >= 3 and lengths.max() <= 8
    assert len(set(lengths.tolist())) > 1  # lengths really vary
    for row_in, row_out, n in zip(inputs, targets, lengths.tolist()):
        assert (row_in[n:] == PAD).all() and (row_out[n:] == IGNORE).all()
        digits = row_in[:n]
        assert (digits < 10).all()
        expected = {"copy": digits, "reverse": digits.flip(dims=[0]), "sort": digits.sort().values}[task]
        assert torch.equal(row_out[:n], expected)


def test_accuracy_ignores_padded_positions():
    inputs, targets = make_batch("copy", 16, 6, torch.Generator().manual_seed(0), min_length=2)

    class Oracle(nn.Module):
        # right at every real position and wrong (class 0 vs IGNORE) at every padded one
        def forward(self, idx):
            return nn.functional.one_hot(targets.clamp(min=0), 11).float()

    assert evaluate(Oracle(), inputs, targets) == (1.0, 1.0)


def test_batches_are_reproducible_from_the_seed():
    a = make_batch("sort", 8, 5, torch.Generator().manual_seed(3))
    b = make_batch("sort", 8, 5, torch.Generator().manual_seed(3))
    c = make_batch("sort", 8, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_tasks_reject_bad_arguments_with_their_names():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="task"):
        make_batch("shuffle", 4, 4, generator)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch("copy", 0, 4, generator)
    with pytest.raises(ValueError, match="length"):
        make_batch("copy", 4, 0, generator)
    with pytest.raises(ValueError, match="min_length"):
        make_batch("copy", 4, 4, generator, min_length=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_factor(0, -1)
    with pytest.raises(ValueError, match="steps"):
        train_on_task(small_model(), "copy", steps=0, lr=1e-3)


def test_warmup_ramps_linearly_then_stays_at_one():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


@pytest.mark.parametrize("task", TASKS)
def test_training_lowers_the_loss(task):
    torch.manual_seed(0)
    model = small_model(block_size=5)
    history = train_on_task(model, task, steps=60, lr=3e-3, batch_size=32, length=5, seed=0)
    assert len(history.step_loss) == 60 and not history.diverged
    first, last = sum(history.step_loss[:5]) / 5, sum(history.step_loss[-5:]) / 5
    assert last < 0.8 * first
    assert 0.0 <= history.token_accuracy <= 1.0


def test_on_step_sees_every_step_and_leaves_training_unchanged():
    plain = train_on_task(small_model(block_size=5), "copy", steps=4, lr=3e-3, batch_size=8, length=5)
    steps_seen = []
    history = SequenceHistory()
    watched = train_on_task(
        small_model(block_size=5), "copy", steps=4, lr=3e-3, batch_size=8, length=5,
        history=history, on_step=steps_seen.append,
    )
    assert watched is history
    assert steps_seen == [0, 1, 2, 3, 4]  # before training, then after every step
    assert watched.step_loss == plain.step_loss
