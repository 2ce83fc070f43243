"""Per-token MLP projector (LLaVA-style) for visual-prefix recipes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.base import Projector


class TokenMLP(Projector):
    """Per-token ``Linear-GELU-Linear`` (LLaVA-style): every encoder token becomes one LM embedding.

    Args:
        in_dim: Encoder token size.
        out_dim: LM hidden size.
        hidden_dim: Hidden width (default ``out_dim``).
        num_tokens: Average-pool the tokens to this many first (``None``: keep all, padding mask kept).
            The pooling windows span the padded length and average padding in, so use it on unpadded
            tokens (image patches); speech or text tokens need ``None`` (or :class:`Resampler`).
    """

    uses_tokens = True

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_tokens: int | None = None) -> None:
        super().__init__(in_dim, out_dim)
        self.num_tokens = num_tokens
        self.per_token = num_tokens is None
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim or out_dim)
        self.fc2 = nn.Linear(hidden_dim or out_dim, out_dim)

    def forward(self, features: EncoderOutput) -> Tensor:
        if features.tokens is None:
            raise ValueError("TokenMLP maps encoder tokens but the encoder output has none")
        x = features.tokens  # [B, T, D]
        if self.num_tokens is not None:
            x = F.adaptive_avg_pool1d(x.transpose(1, 2), self.num_tokens).transpose(1, 2)  # [B, K, D]
        return self.fc2(F.gelu(self.fc1(self.norm(x))))  # [B, K, out_dim]
