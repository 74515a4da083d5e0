"""A tiny Transformer whose normalization layer and its placement are parameters.

Written in the style of nanoGPT's ``model.py``: classes bottom-up, ``forward`` reads like the math,
shapes in comments with B = batch, T = sequence length (tokens), C = channels (the model width).

Two choices are the point of the file:

``norm``
    ``"layer"`` (LayerNorm over the C channels of each token, what Transformers use),
    ``"rms"`` (RMSNorm, Zhang & Sennrich 2019, what LLaMA uses), ``"batch"`` (BatchNorm with one
    set of statistics per channel over all B*T tokens of the batch, the option the chapters
    argue against) or ``"none"``.
``placement``
    ``"post"``: the norm follows each residual addition, as in the original Transformer
    (Vaswani et al. 2017): ``x = norm(x + sublayer(x))``.
    ``"pre"``: the norm sits on the branch, the residual stream is left alone
    (Xiong et al. 2020): ``x = x + sublayer(norm(x))``, plus one final norm before the head.

Two options, off by default, come from the work on training deep and large models stably:

``qk_norm``
    ``"layer"`` or ``"rms"``: every head's queries and keys are normalized before their dot
    product (:class:`normlib.qk_norm.QKNorm`; Dehghani et al. 2023, Wortsman et al. 2024), which
    bounds the attention logits.
``deepnorm``
    DeepNorm (Wang et al. 2022), a Post-LN whose residual is up-weighted by alpha before the
    addition, ``x = norm(alpha * x + sublayer(x))``, and whose branch weights start scaled down by
    beta; see :func:`deepnorm_constants` and :func:`deepnorm_init_`.

The attention is bidirectional (no causal mask): the chapters' tasks label every position of an
input sequence (see :mod:`normlib.book.tasks`), like an encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import normlib
from normlib.qk_norm import QKNorm

NORMS = ("layer", "rms", "batch", "none", "dyt")
PLACEMENTS = ("pre", "post")


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    r"""DeepNorm's ``(alpha, beta)`` for an encoder of ``n_layer`` layers (Wang et al. 2022, Table 1,
    encoder-only row; their decoder-only row is the same with M decoder layers for N):

    .. math::

        \alpha = (2N)^{1/4}, \qquad \beta = (8N)^{-1/4}.

    Their derivation bounds the change of the model's output in one update by a constant
    independent of N: alpha up-weights the residual so that each branch's output is a smaller part
    of the sum the norm sees, and beta scales down the initial weights of the value projection, the
    output projection and the MLP (the query and key projections keep gain 1).
    """
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"n_layer must be a positive int, got {n_layer!r}")
    return (2 * n_layer) ** 0.25, (8 * n_layer) ** -0.25


class BatchNormOverTokens(nn.Module):
    """BatchNorm for (B, T, C) activations: each channel's statistics are taken over all B*T tokens.

    This is how BatchNorm is applied to a sequence model when one tries (Shen et al. 2020 call it
    the naive use of BN in Transformers): the tokens of every sequence in the batch, padding
    included, share one mean and one variance per channel. The wrapped ``bn`` is an ordinary
    :class:`normlib.BatchNorm1d`, so its running statistics are the usual buffers.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = normlib.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return self.bn(x.reshape(B * T, C)).reshape(B, T, C)  # statistics over the B*T rows


def make_norm(kind: str, num_features: int) -> nn.Module:
    """The normalization layer ``kind`` (one of :data:`NORMS`) for tokens of ``num_features`` channels."""
    if kind == "layer":
        return normlib.LayerNorm(num_features)
    if kind == "rms":
        return normlib.RMSNorm(num_features)
    if kind == "batch":
        return BatchNormOverTokens(num_features)
    if kind == "dyt":  # Dynamic Tanh (Zhu et al. 2025), no statistics at all
        return normlib.DyT(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), every token attending to all.

    With ``qk_norm`` (``"layer"`` or ``"rms"``), queries and keys are normalized per head over their
    hs channels before the dot product (:class:`normlib.qk_norm.QKNorm`).
    """

    def __init__(self, n_embd: int, n_head: int, qk_norm: str | None = None):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_head={n_head} must divide n_embd={n_embd}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)  # queries, keys and values in one matmul
        self.proj = nn.Linear(n_embd, n_embd)
        if qk_norm is not None:
            self.qk_norm = QKNorm(n_embd // n_head, qk_norm)
        else:
            self.qk_norm = None

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (after QK-norm, if any) and values of ``x`` (B, T, C), each (B, nh, T, hs)."""
        B, T, C = x.shape
        hs = C // self.n_head  # head size
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        return q, k, v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The attention logits q . k / sqrt(hs) of ``x`` (B, T, C), shape (B, nh, T, T)."""
        q, k, _ = self.heads(x)
        return (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)  # 3 x (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
        att = att.softmax(dim=-1)  # each query's weights over the T keys sum to 1
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """The position-wise feed-forward sub-layer: widen 4x, GELU, project back."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One Transformer layer: attention then MLP, each on a residual branch, with its two norms
    placed before the branch (Pre-LN) or after the addition (Post-LN).

    ``residual_scale`` is DeepNorm's alpha (Post-LN only): the residual is multiplied by it before
    the addition. The default 1.0 is the plain layer."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        norm: str = "layer",
        placement: str = "pre",
        *,
        qk_norm: str | None = None,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale!r}")
        if placement == "pre" and residual_scale != 1.0:
            raise ValueError(
                f"residual_scale must be 1.0 with placement='pre' (DeepNorm scales a Post-LN residual), "
                f"got {residual_scale!r}"
            )
        self.placement = placement
        self.residual_scale = residual_scale
        self.norm_1 = make_norm(norm, n_embd)
        self.attn = SelfAttention(n_embd, n_head, qk_norm)
        self.norm_2 = make_norm(norm, n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.placement == "pre":
            x = x + self.attn(self.norm_1(x))
            x = x + self.mlp(self.norm_2(x))
        elif self.residual_scale == 1.0:
            x = self.norm_1(x + self.attn(x))
            x = self.norm_2(x + self.mlp(x))
        else:  # DeepNorm
            x = self.norm_1(self.residual_scale * x + self.attn(x))
            x = self.norm_2(self.residual_scale * x + self.mlp(x))
        return x


def deepnorm_init_(block: Block, beta: float) -> None:
    """Scale ``block``'s value projection, attention output projection and MLP weights by ``beta``
    in place, as DeepNorm initializes them (Wang et al. 2022, Figure 2: Xavier with gain beta for
    these, gain 1 for the query and key projections). Scaling a Xavier-uniform matrix by beta is
    Xavier-uniform with gain beta."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    C = block.attn.proj.in_features
    with torch.no_grad():
        block.attn.qkv.weight[2 * C :].mul_(beta)  # rows of the value projection: (C, C)
        for linear in (block.attn.proj, block.mlp.fc, block.mlp.proj):
            linear.weight.mul_(beta)


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks and a linear head giving one set of
    logits per position: the smallest model in which norm choice and placement can be compared.

    Weights of the linear layers are Xavier-uniform with zero biases, the initialization whose
    gradients Xiong et al. (2020) analyse; embeddings are N(0, 1), PyTorch's default.

    ``qk_norm`` (``None``, ``"layer"`` or ``"rms"``) normalizes queries and keys in every attention;
    ``deepnorm=True`` (Post-LN only) makes every block a DeepNorm block with
    :func:`deepnorm_constants` ``(n_layer)`` and :func:`deepnorm_init_`.
    """

    def __init__(
        self,
        vocab_size: int = 10,
        block_size: int = 8,
        n_embd: int = 32,
        n_head: int = 4,
        n_layer: int = 2,
        norm: str = "layer",
        placement: str = "pre",
        qk_norm: str | None = None,
        deepnorm: bool = False,
    ):
        super().__init__()
        if n_layer < 1:
            raise ValueError(f"n_layer must be >= 1, got {n_layer}")
        if deepnorm and placement != "post":
            raise ValueError(f"deepnorm=True needs placement='post' (DeepNorm is a Post-LN), got {placement!r}")
        self.block_size = block_size
        self.placement = placement
        self.token_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        alpha, beta = deepnorm_constants(n_layer) if deepnorm else (1.0, 1.0)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, norm, placement, qk_norm=qk_norm, residual_scale=alpha)
            for _ in range(n_layer)
        )
        # Pre-LN leaves the residual stream unnormalized, so it needs one more norm before the head;
        # in Post-LN the last block already ends with a norm.
        self.norm_f = make_norm(norm, n_embd) if placement == "pre" else nn.Identity()
        self.head = nn.Linear(n_embd, vocab_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if deepnorm:
            for block in self.blocks:
                deepnorm_init_(block, beta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be token ids of shape (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"idx has T={T} tokens, more than block_size={self.block_size}")
        positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.token_emb(idx) + self.pos_emb(positions)  # (B, T, C), positions broadcast over B
        for block in self.blocks:
            x = block(x)  # the residual stream, (B, T, C)
        return self.head(self.norm_f(x))  # (B, T, vocab_size)
