"""Projectors that read token sequences: attention pooling and a Perceiver/Q-Former-style resampler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.base import Projector
from projectors.mlp import MLPBlock


def _tokens_and_padding(features: EncoderOutput) -> tuple[Tensor, Tensor | None]:
    if features.tokens is None:
        raise ValueError(
            "this projector pools over tokens but the encoder output has none "
            "(use an encoder with has_tokens=True, or cache tokens with the feature cache)"
        )
    key_padding = None if features.mask is None else ~features.mask.bool()  # True = ignore
    return features.tokens, key_padding


class CrossAttentionBlock(nn.Module):
    """Learned queries attend to encoder tokens, then a residual MLP (pre-norm)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.mlp = MLPBlock(dim, 4 * dim, dropout, "layer")

    def forward(self, queries: Tensor, tokens: Tensor, key_padding: Tensor | None) -> Tensor:
        kv = self.norm_kv(tokens)
        attended, _ = self.attn(self.norm_q(queries), kv, kv, key_padding_mask=key_padding, need_weights=False)
        return self.mlp(queries + attended)


class AttentionPool(Projector):
    """Attention pooling with learned queries over the encoder's tokens (padding masked).

    ``num_queries`` queries attend to the tokens; their outputs are averaged and projected to ``out_dim``.

    Args:
        in_dim: Token feature size.
        out_dim: Shared embedding size.
        num_queries: Learned queries.
        num_heads: Attention heads (must divide ``hidden_dim``).
        hidden_dim: Query width (default ``in_dim``).
        dropout: Attention and MLP dropout.
    """

    uses_tokens = True

    def __init__(
        self, in_dim: int, out_dim: int, num_queries: int = 1, num_heads: int = 4, hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dim, out_dim)
        hidden_dim = hidden_dim or in_dim
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * hidden_dim**-0.5)
        self.block = CrossAttentionBlock(hidden_dim, in_dim, num_heads, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: EncoderOutput) -> Tensor:
        tokens, key_padding = _tokens_and_padding(features)  # [B, T, D], [B, T]
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, Q, H]
        pooled = self.block(q, tokens, key_padding).mean(dim=1)  # [B, H]
        return self.proj(self.norm(pooled))


class Resampler(Projector):
    """Perceiver resampler / small Q-Former: ``num_queries`` learned queries through ``depth`` blocks of
    cross-attention to the tokens and self-attention among queries (Alayrac et al., 2022; Li et al., 2023).

    Returns ``[B, num_queries, out_dim]`` prefix tokens when ``pool=False`` (visual prefix recipes) or the
    mean over queries, ``[B, out_dim]``, when ``pool=True`` (embedding recipes).
    """

    uses_tokens = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 8,
        depth: int = 2,
        hidden_dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.0,
        pool: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim)
        self.pool = pool
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * hidden_dim**-0.5)
        self.cross = nn.ModuleList(CrossAttentionBlock(hidden_dim, in_dim, num_heads, dropout) for _ in range(depth))
        self.self_attn = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_dim, num_heads, 4 * hidden_dim, dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: EncoderOutput) -> Tensor:
        tokens, key_padding = _tokens_and_padding(features)
        x = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # [B, Q, H]
        for cross, self_attn in zip(self.cross, self.self_attn):
            x = self_attn(cross(x, tokens, key_padding))
        x = self.proj(self.norm(x))  # [B, Q, out_dim]
        return x.mean(dim=1) if self.pool else x
