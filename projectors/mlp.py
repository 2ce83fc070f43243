from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from encoders.base import EncoderOutput
from projectors.base import Projector

Norm = Literal["layer", "batch", "none"]


def _norm(kind: Norm, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'layer', 'batch' or 'none', got {kind!r}")


class MLPBlock(nn.Module):
    """``x + Dropout(Linear(GELU(Linear(Norm(x)))))`` (pre-norm residual block)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float, norm: Norm) -> None:
        super().__init__()
        self.norm = _norm(norm, dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class MLP(Projector):
    """MLP head over pooled features: input norm, ``in -> hidden``, residual blocks, ``hidden -> out``.

    With ``norm="batch"`` this is the BatchNorm head of uCLIP (Gwak et al., 2025); with
    ``num_blocks=0`` it is the plain 2-layer ``Linear-GELU-Linear`` projector.

    Args:
        in_dim: Encoder feature size.
        out_dim: Shared embedding size.
        hidden_dim: Width of the hidden layers (default ``max(in_dim, out_dim)``).
        num_blocks: Residual MLP blocks between the input and output layers.
        dropout: Dropout inside blocks and before the output layer.
        norm: ``"layer"``, ``"batch"`` or ``"none"``; applied to the input and inside blocks.
        input_norm: Normalise the input features first (helps anisotropic encoders like Whisper).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        num_blocks: int = 1,
        dropout: float = 0.1,
        norm: Norm = "layer",
        input_norm: bool = True,
    ) -> None:
        super().__init__(in_dim, out_dim)
        hidden_dim = hidden_dim or max(in_dim, out_dim)
        self.input_norm = _norm(norm, in_dim) if input_norm else nn.Identity()
        self.fc_in = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.blocks = nn.Sequential(*[MLPBlock(hidden_dim, 2 * hidden_dim, dropout, norm) for _ in range(num_blocks)])
        self.drop = nn.Dropout(dropout)
        self.fc_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: EncoderOutput) -> Tensor:
        x = self.act(self.fc_in(self.input_norm(features.pooled)))  # [B, H]
        x = self.blocks(x)
        return self.fc_out(self.drop(x))  # [B, out_dim]
