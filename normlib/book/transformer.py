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

The attention is bidirectional (no causal mask): the chapters' tasks label every position of an
input sequence (see :mod:`normlib.book.tasks`), like an encoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import normlib

NORMS = ("layer", "rms", "batch", "none")
PLACEMENTS = ("pre", "post")


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
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), every token attending to all."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_head={n_head} must divide n_embd={n_embd}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)  # queries, keys and values in one matmul
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head  # head size
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
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
    placed before the branch (Pre-LN) or after the addition (Post-LN)."""

    def __init__(self, n_embd: int, n_head: int, norm: str = "layer", placement: str = "pre"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        self.norm_1 = make_norm(norm, n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.norm_2 = make_norm(norm, n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        if self.placement == "pre":
            x = x + self.attn(self.norm_1(x))
            x = x + self.mlp(self.norm_2(x))
        else:
            x = self.norm_1(x + self.attn(x))
            x = self.norm_2(x + self.mlp(x))
        return x


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks and a linear head giving one set of
    logits per position: the smallest model in which norm choice and placement can be compared.

    Weights of the linear layers are Xavier-uniform with zero biases, the initialization whose
    gradients Xiong et al. (2020) analyse; embeddings are N(0, 1), PyTorch's default.
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
    ):
        super().__init__()
        if n_layer < 1:
            raise ValueError(f"n_layer must be >= 1, got {n_layer}")
        self.block_size = block_size
        self.placement = placement
        self.token_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, norm, placement) for _ in range(n_layer))
        # Pre-LN leaves the residual stream unnormalized, so it needs one more norm before the head;
        # in Post-LN the last block already ends with a norm.
        self.norm_f = make_norm(norm, n_embd) if placement == "pre" else nn.Identity()
        self.head = nn.Linear(n_embd, vocab_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

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
