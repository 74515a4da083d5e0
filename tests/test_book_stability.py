"""The stability options of the tiny Transformer (QK-norm, DeepNorm in normlib/book/transformer.py)
and the instruments of normlib/book/stability.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlib.book.stability import (
    attention_stats,
    layer_grad_norms,
    lr_sensitivity,
    power_law_exponent,
    residual_stream_rms,
    train_and_watch,
)
from normlib.book.tasks import make_batch, train_on_task
from normlib.book.transformer import Block, SelfAttention, TinyTransformer, deepnorm_constants, deepnorm_init_
from normlib.qk_norm import QKNorm


def model(seed: int = 0, **kwargs) -> TinyTransformer:
    torch.manual_seed(seed)
    config = dict(block_size=6, n_embd=16, n_head=2, n_layer=3)
    config.update(kwargs)
    return TinyTransformer(**config)


def tokens(batch: int = 8, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_deepnorm_constants_follow_wang_et_al():
    alpha, beta = deepnorm_constants(6)
    assert alpha == pytest.approx(12**0.25) and beta == pytest.approx(48**-0.25)
    alpha_deep, beta_deep = deepnorm_constants(96)
    assert alpha_deep > alpha and beta_deep < beta  # deeper: more residual weight, smaller branches
    with pytest.raises(ValueError, match="n_layer"):
        deepnorm_constants(0)


def test_deepnorm_model_scales_residuals_and_branch_weights_only():
    plain = model(placement="post")
    deep = model(placement="post", deepnorm=True)  # same seed: the same Xavier draws before scaling
    alpha, beta = deepnorm_constants(3)
    C = 16
    for a, b in zip(plain.blocks, deep.blocks):
        assert a.residual_scale == 1.0 and b.residual_scale == alpha
        torch.testing.assert_close(b.attn.qkv.weight[: 2 * C], a.attn.qkv.weight[: 2 * C], rtol=0, atol=0)
        torch.testing.assert_close(b.attn.qkv.weight[2 * C :], beta * a.attn.qkv.weight[2 * C :])
        for name in ("attn.proj", "mlp.fc", "mlp.proj"):
            torch.testing.assert_close(b.get_submodule(name).weight, beta * a.get_submodule(name).weight)
    torch.testing.assert_close(deep.token_emb.weight, plain.token_emb.weight, rtol=0, atol=0)


def test_deepnorm_block_computes_norm_of_alpha_x_plus_branch():
    torch.manual_seed(1)
    block = Block(16, 2, placement="post", residual_scale=2.5)
    x = torch.randn(3, 5, 16)
    h = block.norm_1(2.5 * x + block.attn(x))
    expected = block.norm_2(2.5 * h + block.mlp(h))
    torch.testing.assert_close(block(x), expected)
    plain = Block(16, 2, placement="post")
    plain.load_state_dict(block.state_dict())
    assert not torch.allclose(plain(x), block(x))


def test_deepnorm_and_residual_scale_reject_bad_arguments():
    with pytest.raises(ValueError, match="deepnorm"):
        model(placement="pre", deepnorm=True)
    with pytest.raises(ValueError, match="residual_scale"):
        Block(16, 2, placement="pre", residual_scale=2.0)
    with pytest.raises(ValueError, match="residual_scale"):
        Block(16, 2, placement="post", residual_scale=0.0)
    with pytest.raises(ValueError, match="beta"):
        deepnorm_init_(Block(16, 2), -1.0)


def test_attention_without_qk_norm_is_scaled_dot_product_attention():
    torch.manual_seed(2)
    attn = SelfAttention(16, 4)
    assert attn.qk_norm is None
    x = torch.randn(2, 5, 16)
    q, k, v = attn.heads(x)  # (B, nh, T, hs)
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(attn(x), attn.proj(expected))
    torch.testing.assert_close(attn.logits(x), q @ k.transpose(-2, -1) / 2.0)  # sqrt(hs = 4)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm_option_normalizes_every_heads_queries_and_keys(kind):
    m = model(qk_norm=kind)
    assert all(isinstance(block.attn.qk_norm, QKNorm) and block.attn.qk_norm.kind == kind for block in m.blocks)
    attn = m.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.mul_(1e3)  # huge queries and keys
    x = torch.randn(4, 6, 16)
    q, k, _ = attn.heads(x)  # (B, nh, T, hs)
    rms = q.pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    hs = 8
    assert attn.logits(x).abs().max() <= math.sqrt(hs) * (1 + 1e-3)  # unit gains: sqrt(hs) * cosine
    assert torch.isfinite(m(tokens())).all()


def test_residual_stream_rms_reads_the_stream_entering_each_block():
    m = model(placement="pre")
    idx = tokens()
    rms = residual_stream_rms(m, idx)
    assert rms.shape == (4,)
    positions = torch.arange(6)
    embeddings = m.token_emb(idx) + m.pos_emb(positions)  # (B, T, C)
    assert rms[0] == pytest.approx(embeddings.pow(2).mean(dim=-1).sqrt().mean().item(), rel=1e-6)
    with torch.no_grad():  # silent branches: the Pre-LN stream passes through unchanged
        for block in m.blocks:
            for linear in (block.attn.proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
    np.testing.assert_allclose(residual_stream_rms(m, idx), rms[0], rtol=1e-6)
    post = residual_stream_rms(model(placement="post"), idx)
    np.testing.assert_allclose(post[1:], 1.0, atol=1e-3)  # renormalized by every block


def test_layer_grad_norms_are_the_norms_of_each_second_mlp_matrix():
    m = model()
    with pytest.raises(ValueError, match="backward"):
        layer_grad_norms(m)
    inputs, targets = make_batch("reverse", 8, 6, torch.Generator().manual_seed(0))
    F.cross_entropy(m(inputs).flatten(0, 1), targets.flatten()).backward()
    expected = [block.mlp.proj.weight.grad.norm().item() for block in m.blocks]
    np.testing.assert_allclose(layer_grad_norms(m), expected)
    assert len(set(expected)) == 3


def test_attention_stats_of_uniform_and_of_peaked_attention():
    m = model()
    with torch.no_grad():
        for block in m.blocks:
            block.attn.qkv.weight[: 2 * 16].zero_()  # queries and keys 0: every logit 0
            block.attn.qkv.bias.zero_()
    max_logit, entropy = attention_stats(m, tokens())
    np.testing.assert_allclose(max_logit, 0.0, atol=1e-6)
    np.testing.assert_allclose(entropy, math.log(6), rtol=1e-5)  # uniform over T = 6 keys
    peaked = model(seed=3)
    with torch.no_grad():
        for block in peaked.blocks:
            block.attn.qkv.weight[: 2 * 16].mul_(30.0)  # logits x 900
    max_logit_peaked, entropy_peaked = attention_stats(peaked, tokens())
    assert (max_logit_peaked > 100).all() and (entropy_peaked < 0.2).all()


def test_train_and_watch_sees_the_batches_of_train_on_task_and_reads_the_attention():
    watched = train_and_watch(model(), "reverse", steps=30, lr=3e-3, batch_size=16, length=6, watch_every=10)
    plain = train_on_task(model(), "reverse", steps=30, lr=3e-3, batch_size=16, length=6)
    assert watched.step_loss == plain.step_loss  # reading the attention does not disturb training
    assert watched.watched_steps == [0, 10, 20, 30]
    assert len(watched.max_logit) == len(watched.min_entropy) == len(watched.output_log_z) == 4
    assert all(v > 0 for v in watched.output_log_z)
    assert watched.max_logit[-1] != watched.max_logit[0]
    assert watched.final_loss(window=5) == pytest.approx(np.mean(plain.step_loss[-5:]))
    assert 0.0 <= watched.token_accuracy <= 1.0
    with pytest.raises(ValueError, match="watch_every"):
        train_and_watch(model(), "reverse", steps=3, lr=1e-3, watch_every=0)
    with pytest.raises(ValueError, match="lr"):
        train_and_watch(model(), "reverse", steps=3, lr=0.0)


def test_lr_sensitivity_caps_at_the_initial_loss_and_counts_divergence_as_it():
    # losses per lr: 0.5, 0.1, 3.0 (worse than the start: capped at 2.3), inf (diverged: 2.3)
    value = lr_sensitivity([0.5, 0.1, 3.0, math.inf], initial_loss=2.3, best_loss=0.1)
    assert value == pytest.approx((0.5 + 0.1 + 2.3 + 2.3) / 4 - 0.1)
    with pytest.raises(ValueError, match="final_losses"):
        lr_sensitivity([], 2.3, 0.1)


def test_power_law_exponent_recovers_the_exponent():
    x = np.array([6.0, 12.0, 24.0, 48.0])
    assert power_law_exponent(x, 3.0 * x**0.5) == pytest.approx(0.5)
    assert power_law_exponent(x, 2.0 / x) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="positive"):
        power_law_exponent(x, -x)
    with pytest.raises(ValueError, match="equal-length"):
        power_law_exponent(x, x[:2])
