from __future__ import annotations

from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.base import Projector


class Linear(Projector):
    """A single affine map of the pooled features (LiT / least-squares style head)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__(in_dim, out_dim)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, features: EncoderOutput) -> Tensor:
        return self.proj(features.pooled)  # [B, out_dim]
